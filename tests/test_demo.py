"""The README's first command: the demo runs offline end to end and the reloaded model keeps the dense function."""

from hf_moe.cli import main
from hf_moe.clip_moe.demo import run


def test_demo_runs_end_to_end(tmp_path, capsys):
    result = run(tmp_path / "demo")
    assert result["class"].startswith("transformers_modules.")  # loaded from the folder's own code
    assert result["class"].endswith("modeling_clip_moe.CLIPMoEModel")
    assert result["max_abs_difference"] <= 1e-5
    assert len(result["predictions"]) == 10 and all(0 <= p <= 9 for p in result["predictions"])
    assert (result["model_dir"] / "model.safetensors").is_file()
    assert "The trained CLIP-MoE folder is" in capsys.readouterr().out


def test_demo_command_is_wired(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0

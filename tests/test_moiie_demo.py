"""`hf-moe demo --family moiie`: the tiny SigLIP + Phi-3 are upcycled into MoIIE, trained through stage 1 and 2, saved
with their remote code, and the image-text-to-text pipeline's answer for a held-out digit is the same in a fresh
process where hf_moe cannot be imported."""

import json

import torch
from safetensors.torch import load_file

from hf_moe.cli import FAMILY_DEMOS, main
from hf_moe.moiie.demo import RESULT_FILE
from hf_moe.moiie.toy import digit_question_words


def test_demo_upcycles_trains_answers_and_reloads(tmp_path, capsys):
    assert "moiie" in FAMILY_DEMOS
    assert main(["demo", "--family", "moiie", "--output-dir", str(tmp_path)]) == 0
    output_dir = tmp_path / "moiie"
    result = json.loads((output_dir / RESULT_FILE).read_text())

    model_dir = output_dir / "moiie-stage2"
    for name in ("config.json", "model.safetensors", "modeling_moiie.py", "processing_moiie.py", "README.md"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["variant"] == "moiie" and config["num_shared_experts"] == 2
    # stage 1 trained the projector only; stage 2 the decoder (experts, routers) too
    upcycled, stage1, stage2 = (
        load_file(output_dir / name / "model.safetensors")
        for name in ("moiie-upcycled", "moiie-stage1", "moiie-stage2")
    )
    changed = {key for key in upcycled if not torch.equal(upcycled[key], stage1[key])}
    assert changed and all("multi_modal_projector." in key for key in changed)
    assert not torch.equal(
        stage1["model.language_model.layers.1.mlp.experts.down_proj"],
        stage2["model.language_model.layers.1.mlp.experts.down_proj"],
    )

    assert result["answer"] in digit_question_words()  # one whole word of the vocabulary, not a special token
    assert result["reloaded_answer"] == result["answer"]
    assert result["reloaded_class"].endswith("modeling_moiie.MoIIEPhi3ForCausalLM")
    assert not result["reloaded_class"].startswith("hf_moe")
    assert all(0.0 <= value <= 1.0 for value in result["held_out_accuracy"].values())
    out = capsys.readouterr().out
    assert f"-> {result['answer']!r}" in out and "fresh Python process" in out

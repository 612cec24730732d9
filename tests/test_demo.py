"""The README's first command: `hf-moe demo` trains a small CLIP that classifies held-out digits far above chance,
upcycles it without changing its function, runs MCL and router training, and reloads the result without hf_moe
(trust_remote_code) with the same predictions."""

import json

import torch
from safetensors.torch import load_file
from test_demo_figures import assert_readme_shows

from hf_moe.cli import main
from hf_moe.clip_moe.demo import RESULT_FILE


def test_demo_trains_upcycles_and_reloads(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    assert main(["demo", "--family", "clip_moe", "--output-dir", str(output_dir)]) == 0
    result = json.loads((output_dir / RESULT_FILE).read_text())
    printed = capsys.readouterr().out

    # Training is what lifts zero-shot accuracy from chance (0.1) on digits the model never saw.
    assert result["num_held_out_images"] == 297
    assert result["untrained_zero_shot_accuracy"] < 0.25
    assert result["dense"]["zero_shot_accuracy"] >= 0.6
    assert result["clip_moe"]["zero_shot_accuracy"] >= 0.6
    # Retrieval over distinct captions: chance is 1 / num_retrieval_captions (about 0.012).
    assert result["num_retrieval_captions"] >= 60
    for model in ("dense", "clip_moe"):
        assert result[model]["image_to_text_R@1"] >= 0.2 and result[model]["text_to_image_R@1"] >= 0.2
    assert f"dense CLIP: zero-shot {result['dense']['zero_shot_accuracy']:.3f}" in printed
    assert f"CLIP-MoE:   zero-shot {result['clip_moe']['zero_shot_accuracy']:.3f}" in printed

    assert result["max_abs_difference"] <= 1e-5  # sparse upcycling keeps the dense function

    # Loaded from the folder's own code in a process without hf_moe, and it predicts what the in-process model does.
    reloaded = result["reloaded"]
    assert reloaded["class"].startswith("transformers_modules.")
    assert reloaded["class"].endswith("modeling_clip_moe.CLIPMoEModel")
    assert reloaded["predictions"] == result["in_process_predictions"]
    assert reloaded["zero_shot_accuracy"] == result["clip_moe"]["zero_shot_accuracy"]

    # The CLIP-MoE's experts are the distinct MCL stages, and router training moved the routers.
    moe = load_file(output_dir / "clip-moe" / "model.safetensors")
    untrained_routers = load_file(output_dir / "mcl" / "moe" / "model.safetensors")
    experts = moe["vision_model.encoder.layers.0.mlp.experts.up_proj"]
    assert experts.shape[0] == 3
    assert not torch.equal(experts[0], experts[1]) and not torch.equal(experts[1], experts[2])
    router = "vision_model.encoder.layers.0.mlp.router.weight"
    assert not torch.equal(moe[router], untrained_routers[router])
    assert "The trained CLIP-MoE folder is" in printed
    # The demo writes its routing analysis (hf-moe analyze-routing) of the trained CLIP-MoE, both towers.
    routing = json.loads((output_dir / "routing" / "routing.json").read_text())
    assert set(routing["numbers"]["towers"]) == {"vision", "text"} and routing["num_samples"] == 297
    assert (output_dir / "routing" / "clip_moe_vision_expert_share.png").is_file()
    assert_readme_shows("clip_moe", printed)  # the README's figures are this run's

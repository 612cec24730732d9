"""`hf-moe demo --family moiie`: small SigLIP + Phi-3 parts (trained dense, then split) are upcycled into MoIIE, trained
through stage 1 and 2 and saved with their remote code; the model answers questions about held-out digits well above
chance, the image-text-to-text pipeline names most of the digits it is shown, and a fresh process where hf_moe cannot
be imported gives the same answers."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_demo_figures import assert_readme_shows

from hf_moe.cli import FAMILY_DEMOS, main
from hf_moe.moiie.demo import RESULT_FILE
from hf_moe.moiie.toy import digit_question_words
from hf_moe.toy_data import DIGIT_NAMES


def test_demo_upcycles_trains_answers_and_reloads(tmp_path, capsys):
    assert "moiie" in FAMILY_DEMOS
    assert main(["demo", "--family", "moiie", "--output-dir", str(tmp_path)]) == 0
    output_dir = tmp_path / "moiie"
    result = json.loads((output_dir / RESULT_FILE).read_text())

    # The demo writes its routing analysis (hf-moe analyze-routing) of the trained model: every MoE layer of it.
    routing = json.loads((Path(result["routing_dir"]) / "routing.json").read_text())
    assert routing["model"] == str(output_dir / "moiie-stage2") and routing["numbers"]["layers"]

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

    # Held-out accuracy of each question kind, well above chance (0.1 for the digit, 0.5 for yes / no).
    accuracy = result["held_out_accuracy"]
    assert result["num_held_out_images"] == 297
    assert accuracy["digit"] >= 0.4 and accuracy["even"] >= 0.65 and accuracy["greater"] >= 0.6
    # "what digit is this ?" through the pipeline: answers are digit names, most of them right.
    answers, labels = result["answers"], result["labels"]
    assert len(answers) == len(labels) == 8 and all(answer in DIGIT_NAMES for answer in answers)
    assert set(answers) <= set(digit_question_words())
    assert sum(a == b for a, b in zip(answers, labels)) >= 5
    assert result["reloaded_answers"] == answers
    assert result["reloaded_class"].endswith("modeling_moiie.MoIIEPhi3ForCausalLM")
    assert not result["reloaded_class"].startswith("hf_moe")
    out = capsys.readouterr().out
    assert f"digit 1500: {answers[0]!r}" in out and "fresh Python process" in out
    assert_readme_shows("moiie", out)  # the README's figures are this run's

"""The MoDE demo end to end at a small size: a built MoDE folder whose zero-shot pipeline predicts what the model
itself does, per-expert and ensemble accuracies, task weights that form a distribution."""

import json
from pathlib import Path

import pytest

from hf_moe.mode.demo import DEMO_OUTPUTS, HELD_OUT_DIGITS, MODEL_DIR, RESULT_FILE, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mode-demo")
    return output_dir, run_demo(output_dir, seed_steps=20, expert_steps=4, train_digits=300)


def test_demo_writes_its_folders_and_result(demo):
    output_dir, result = demo
    for name in DEMO_OUTPUTS:
        assert (output_dir / name).is_dir(), name
    assert (output_dir / MODEL_DIR / "config.json").is_file()
    assert result["model_dir"] == str(output_dir / MODEL_DIR)
    assert json.loads((output_dir / RESULT_FILE).read_text()) == result
    assert sum(result["pairs_per_expert"]) == 300
    # The demo writes its routing analysis (hf-moe analyze-routing) of the built model, with its clusters.
    routing = json.loads((Path(result["routing_dir"]) / "routing.json").read_text())
    assert routing["numbers"]["pairs_per_expert"] == result["pairs_per_expert"]
    assert (Path(result["routing_dir"]) / "mode_task_weights.png").is_file()


def test_pipeline_predicts_the_models_argmax(demo):
    _, result = demo
    assert len(result["pipeline_predictions"]) == len(result["labels"]) == len(HELD_OUT_DIGITS)
    assert result["pipeline_predictions"] == result["model_predictions"]
    hits = sum(p == label for p, label in zip(result["pipeline_predictions"], result["labels"]))
    assert result["pipeline_accuracy"] == hits / len(result["labels"])
    # The pipeline's single prompt is the one the ensemble accuracy is computed with.
    assert result["ensemble"] == pytest.approx(result["pipeline_accuracy"], abs=1.5 / len(result["labels"]))


def test_accuracies_and_task_weights(demo):
    _, result = demo
    assert len(result["experts"]) == len(result["task_weights"]) == 2
    for value in (result["seed_accuracy"], *result["experts"], result["all_unit"], result["ensemble"]):
        assert 0.0 <= value <= 1.0
    assert all(w >= 0 for w in result["task_weights"])
    assert sum(result["task_weights"]) == pytest.approx(1.0, abs=1e-5)

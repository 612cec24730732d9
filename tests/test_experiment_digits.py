"""examples/clip_moe/experiment_digits.py with tiny settings: every arm trains and is evaluated, the JSON and the
markdown table agree, and the aggregation over seeds is right."""

import json
import math

import pytest

from helpers import script_fixture


experiment = script_fixture("examples/clip_moe/experiment_digits.py")


def test_experiment_runs_every_arm_and_writes_json_and_table(experiment, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["--seeds", "0", "--train_images", "200", "--pretrain_steps", "10", "--stage_steps", "3"]
    argv += ["--router_steps", "3", "--batch_size", "8", "--output", str(output), "--work_dir", str(tmp_path / "work")]
    experiment.main(argv)
    result = json.loads(output.read_text())

    assert result["extra_training_steps"] == (3 - 1) * 3 + 3
    assert result["num_held_out_images"] == 297
    runs = result["per_seed"]["0"]
    assert set(runs) == set(experiment.METHODS)
    for scores in runs.values():
        assert set(scores) == set(experiment.METRICS)
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    # Every arm's model was trained and kept in its own folder of the work dir.
    work = tmp_path / "work" / "seed0"
    for folder in ("base", "dense_more", "sparse_router", "sparse_all", "mcl_router", "mcl/moe"):
        assert (work / folder / "model.safetensors").is_file(), folder
    # Router training cannot change what a mix of identical experts computes: the sparse-upcycled arm scores as
    # the dense base (up to a near-tie flipping under float rounding).
    for metric, value in runs["dense"].items():
        assert runs["sparse_router"][metric] == pytest.approx(value, abs=1.5 / 84)

    table = result["table"].splitlines()
    assert len(table) == 2 + len(experiment.METHODS)
    mcl_row = next(row for row in table if row.startswith(f"| {experiment.METHODS['mcl_router']} |"))
    assert f"| {runs['mcl_router']['zero_shot_accuracy']:.3f} |" in mcl_row
    assert "| 9 x 8 |" in mcl_row
    assert result["table"] in capsys.readouterr().out


def test_summary_is_mean_and_sample_std_over_seeds(experiment):
    scores = {metric: 0.0 for metric in experiment.METRICS}
    per_seed = {
        seed: {method: {**scores, "zero_shot_accuracy": accuracy} for method in experiment.METHODS}
        for seed, accuracy in ((0, 0.5), (1, 0.7))
    }
    summary = experiment.summarize(per_seed)
    stats = summary["mcl_router"]["zero_shot_accuracy"]
    assert stats["mean"] == pytest.approx(0.6)
    assert stats["std"] == pytest.approx(math.sqrt(0.02))
    assert experiment.summarize({0: per_seed[0]})["dense"]["zero_shot_accuracy"]["std"] is None

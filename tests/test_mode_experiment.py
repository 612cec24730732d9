"""examples/mode/experiment.py at its --quick size: every row is trained, built and evaluated on every task, the
task weights are a distribution, the clusters cover every pair, and the all-data model trained as many steps as the
experts together."""

import json

import pytest

from helpers import script_fixture


experiment = script_fixture("examples/mode/experiment.py", "mode_experiment")


@pytest.fixture(scope="module")
def result(experiment, tmp_path_factory):
    root = tmp_path_factory.mktemp("mode-experiment")
    output = root / "results.json"
    argv = ["--quick", "--seeds", "0", "--num_experts", "2", "--output", str(output)]
    experiment.main([*argv, "--work_dir", str(root / "work")])
    return json.loads(output.read_text()), root / "work" / "seed0"


def test_every_row_scores_every_task(experiment, result):
    result, _ = result
    columns = [*experiment.TASKS, "average"]
    rows = experiment.method_rows(experiment.ExperimentArguments(quick=True, seeds=[0], num_experts=[2]))
    assert list(result["methods"]) == list(rows) == list(result["summary"])
    run = result["per_seed"]["0"]
    for row in rows:
        scores = experiment.row_scores(run, row)
        assert list(scores) == columns, row
        assert all(0.0 <= value <= 1.0 for value in scores.values()), row
        assert scores["average"] == pytest.approx(sum(scores[task] for task in experiment.TASKS) / 4)
        assert result["summary"][row]["average"] == {"mean": pytest.approx(scores["average"]), "std": None}
    scores = run["mode_2"]["scores"]
    experts = [scores["expert_0"], scores["expert_1"]]
    assert scores["best_expert"] == max(experts, key=lambda s: s["average"])
    for task in experiment.TASKS:
        assert scores["expert_max"][task] == max(s[task] for s in experts)
    table = result["table"].splitlines()
    assert len(table) == 2 + len(rows)
    ensemble_line = table[2 + list(rows).index("mode_2/ensemble")]
    assert ensemble_line.endswith(f"| {100 * scores['ensemble']['average']:.1f} |")
    assert result["chance"] == {"digits": 0.1, "photos": 0.5, "shapes": 0.25, "patterns": 0.25}


def test_task_weights_clusters_and_equal_compute(experiment, result):
    result, work = result
    run = result["per_seed"]["0"]["mode_2"]
    for task, weights in run["task_weights"].items():
        assert len(weights) == 2 and all(w >= 0 for w in weights), task
        assert sum(weights) == pytest.approx(1.0, abs=1e-5), task
    # Every training pair belongs to exactly one expert: 120 digits + 8 per class of 2 + 4 + 4 classes.
    assert sum(sum(counts.values()) for counts in run["expert_pairs_by_task"]) == 120 + 8 * 10
    steps = run["steps"]
    assert steps["experts"] == [3, 3]
    assert steps["all_data"] == sum(steps["experts"])
    for folder in ("seed", "mode-2/expert-0", "mode-2/expert-1", "mode-2/all-data", "mode-2/mode"):
        assert (work / folder / "config.json").is_file(), folder

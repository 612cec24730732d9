"""`hf-moe demo`'s WEMoE step: fine-tunes that learn their task, a WEMoE that starts as their task-arithmetic merge,
per-sample routing weights, and a reload without hf_moe that computes the same features."""

import json

from test_demo_figures import assert_readme_shows

from hf_moe.cli import main
from hf_moe.we_moe.demo import DEMO_TASKS, RESULT_FILE


def test_wemoe_demo_merges_routes_and_reloads(tmp_path, capsys):
    assert main(["demo", "--family", "we_moe", "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "wemoe" / RESULT_FILE).read_text())
    printed = capsys.readouterr().out

    accuracy = result["accuracy"]
    # The patterns fine-tune learns its task far beyond the random pretrained model (chance 0.25).
    assert accuracy["fine-tune (own task)"]["patterns"] >= accuracy["pretrained"]["patterns"] + 0.3
    # Untrained routers start at init_lambda for every task: WEMoE computes the task-arithmetic merge.
    assert accuracy["WEMoE (before TTA)"] == accuracy["task arithmetic"]
    assert set(accuracy["WEMoE (before TTA)"]) == set(DEMO_TASKS)
    # One (num_tasks,) routing vector per sample, near init_lambda before adaptation; TTA moves them.
    before, after = (
        result["routing_weights_last_block"]["before TTA"],
        result["routing_weights_last_block"]["after TTA"],
    )
    assert len(before) == len(DEMO_TASKS) and all(len(row) == len(DEMO_TASKS) for row in before)
    assert all(abs(weight - 0.3) < 0.05 for row in before for weight in row)
    assert max(abs(a - b) for row_a, row_b in zip(after, before) for a, b in zip(row_a, row_b)) > 0.01
    assert set(accuracy["WEMoE + TTA"]) == set(DEMO_TASKS)
    assert result["reloaded_class"].startswith("transformers_modules.") and "WEMoECLIPModel" in result["reloaded_class"]
    assert result["reload_max_difference"] <= 1e-6
    assert "loaded transformers_modules." in printed
    # The demo writes its routing analysis (hf-moe analyze-routing) of the adapted WEMoE.
    routing = json.loads((tmp_path / "wemoe" / "routing" / "routing.json").read_text())
    assert (
        routing["numbers"]["data_tasks"] == sorted(DEMO_TASKS)
        and (tmp_path / "wemoe" / "routing" / "we_moe_task_routing.png").is_file()
    )
    assert_readme_shows("we_moe", printed)  # the README's figures are this run's


def test_demo_runs_every_family_in_order_into_one_folder(tmp_path, monkeypatch):
    import hf_moe.cli

    calls = []
    demos = {name: (lambda output_dir, name=name: calls.append((name, output_dir))) for name in hf_moe.cli.FAMILY_DEMOS}
    monkeypatch.setattr(hf_moe.cli, "FAMILY_DEMOS", demos)
    assert main(["demo", "--output_dir", str(tmp_path)]) == 0
    assert calls == [(name, str(tmp_path)) for name in ("clip_moe", "we_moe", "moiie", "mode")]

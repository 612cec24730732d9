"""Smoke test of benchmarks/real_width_step.py at tiny widths: every run trains through its family's Trainer, and the
JSON carries each run's timing, memory, parameter counts, losses and passed checks; the range checks refuse values
outside their bounds. No timing assertions (the real-width figures are in benchmarks/results)."""

import json
import math

from helpers import script_fixture


TINY = ["--tiny", "--warmup", "0", "--steps", "1", "--text_tokens", "16", "--tta_batch_size", "1"]


bench = script_fixture("benchmarks/real_width_step.py")


def test_every_run_trains_and_reports_its_figures(bench, tmp_path):
    output = tmp_path / "report.json"
    assert bench.main([*TINY, "--in_process", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["ok"] is True and report["widths"] == "tiny (smoke test)"
    assert list(report["results"]) == list(bench.RUNS)
    for run, result in report["results"].items():
        assert result["ok"] is True and result["checks"] == [], run
        assert result["checks_passed"] == result["checks_total"] > 0, run
        assert 0 < result["parameters"]["trainable"] <= result["parameters"]["total"], run
        assert result["s_per_step"] > 0 and len(result["s_all_steps"]) == 1, run
        assert result["memory_mib"]["peak_rss"] >= result["memory_mib"]["rss_at_start"] > 0, run
        assert all(math.isfinite(value) for value in result["losses"]["loss"]), run
        assert result["measured_steps"] == 1 and result["command"].endswith("--output " + str(output)), run
    results = report["results"]
    assert results["clip_moe/router"]["trainable_param_dtypes"] == ["bfloat16"]
    assert {"contrastive_loss", "vision_balance_loss", "text_balance_loss"} <= set(results["clip_moe/router"]["losses"])
    assert {"lm_loss", "vision_aux_loss", "language_aux_loss"} <= set(results["moiie/stage2"]["losses"])
    assert {f"entropy/{task}" for task in bench.TASK_CLASSES} <= set(results["we_moe/tta"]["losses"])
    # Stage 1 trains the projector only, stage 2 the LLM too; AdaMerging one coefficient per tensor and task.
    assert results["moiie/stage1"]["parameters"]["trainable"] < results["moiie/stage2"]["parameters"]["trainable"]
    assert results["we_moe/adamerging"]["parameters"]["trainable"] % len(bench.TASK_CLASSES) == 0


def test_range_checks(bench):
    assert bench.balance_check("b", 2.0, top_k=2, num_experts=4)["ok"]
    assert bench.balance_check("b", 4.0, top_k=2, num_experts=4)["ok"]
    assert not bench.balance_check("b", 1.9, top_k=2, num_experts=4)["ok"]
    assert not bench.balance_check("b", 4.1, top_k=2, num_experts=4)["ok"]
    assert not bench.balance_check("b", math.nan, top_k=2, num_experts=4)["ok"]
    assert bench.entropy_check("e", math.log(10), 10)["ok"] and bench.entropy_check("e", 0.0, 10)["ok"]
    assert not bench.entropy_check("e", math.log(10) + 0.01, 10)["ok"]
    assert not bench.finite_check("l", math.inf)["ok"] and not bench.finite_check("l", None)["ok"]


def test_a_failed_run_fails_the_command(bench, tmp_path):
    """A run that fails (here: a batch of no rows, which the Trainer refuses) makes the report not ok and the
    exit status 1; runs kept from an earlier file with --update stay in it."""
    output = tmp_path / "report.json"
    output.write_text(json.dumps({"command": "earlier", "timing": {"warmup_steps": 1, "measured_steps": 2},
                                  "results": {"mode/expert": {"ok": True}}}))  # fmt: skip
    argv = [*TINY, "--in_process", "--families", "clip_moe/mcl", "--batch_size", "0", "--output", str(output)]
    assert bench.main([*argv, "--update"]) == 1
    report = json.loads(output.read_text())
    assert report["ok"] is False and "error" in report["results"]["clip_moe/mcl"]
    assert report["results"]["mode/expert"] == {"ok": True, "command": "earlier", "warmup_steps": 1,
                                                "measured_steps": 2}  # fmt: skip

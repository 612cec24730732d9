"""Smoke test of benchmarks/clip_moe_forward.py at the tiny shape: a worker times one variant and reports its
figures, the per-expert loop equals eager, the variants run interleaved round after round, and the ratios are taken
within each round. No timing assertions (timings on a shared CPU mean nothing at this size)."""

import contextlib
import io
import json

import pytest

from helpers import script_fixture


bench = script_fixture("benchmarks/clip_moe_forward.py")
TINY = ["--batch_size", "2", "--warmup", "0", "--iters", "1"]


@pytest.mark.parametrize("variant", ["dense", "official_loop", "grouped_mm"])
def test_worker_reports_its_variant(bench, variant):
    result = bench.measure(bench.parse_args([*TINY, "--_worker", variant]))
    assert result["ms_per_batch"] > 0 and len(result["ms_all"]) == 1
    assert result["weights_mib"] > 0 and result["peak_memory_mib"] >= 0 and result["max_rss_mib"] > 0


def test_official_loop_equals_eager(bench):
    args = bench.parse_args(TINY)
    master = bench.build_moe(bench.selected_shape(args), args.num_experts, args.top_k)
    assert bench.check_official_loop(master, bench.selected_shape(args), "cpu")["max_abs_diff"] <= 1e-5


def test_rounds_interleave_the_variants_and_ratios_are_taken_per_round(bench, monkeypatch):
    # The machine is twice as slow in round 2: each round's ratio is 0.5 and 1.0, so the median of the per-round
    # ratios is 0.75, while the ratio of the medians over rounds (25 ms / 30 ms) would be 0.83.
    ms = {("dense", 0): 10.0, ("eager", 0): 20.0, ("dense", 1): 40.0, ("eager", 1): 40.0}
    calls = []

    def fake_worker(script, argv, worker):
        calls.append(worker)
        round_index = sum(call == worker for call in calls) - 1
        return {"ms_per_batch": ms[worker, round_index], "ms_all": [], "peak_memory_mib": 1.0, "weights_mib": 2.0}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main([*TINY, "--variants", "dense", "eager", "--rounds", "2"])
    report = json.loads(stdout.getvalue())
    assert calls == ["dense", "eager", "dense", "eager"]
    eager = report["variants"]["eager"]
    assert eager["ratio_vs_dense_all_rounds"] == pytest.approx([0.5, 1.0])
    assert eager["ratio_vs_dense"] == pytest.approx(0.75)
    assert eager["ms_per_batch"] == pytest.approx(30.0) and eager["images_per_s"] == pytest.approx(2 / 0.03)
    assert "ratio_vs_official_loop" not in eager  # the official loop was not run
    assert report["official_loop_check"]["max_abs_diff"] <= 1e-5
    assert report["timing"]["rounds"] == 2 and report["command"].endswith("--rounds 2")


def test_worker_error_is_reported_not_raised(bench):
    rounds = [{"dense": {"ms_per_batch": 1.0, "peak_memory_mib": 0, "weights_mib": 1}, "batched_mm": {"error": "OOM"}}]
    assert bench.summarise(rounds, batch_size=2)["batched_mm"] == {"error": "OOM"}

"""Smoke test of benchmarks/we_moe_forward.py on a tiny shape: fields of the JSON, batched numbers == the loop's.
No timing assertions (timings on a shared CPU mean nothing at this size)."""

import pytest

from helpers import script_fixture


TINY = ["--shape", "tiny", "--layers", "1", "--batch_size", "4", "--tta_tasks", "2", "--tta_batch_size", "2"]


bench = script_fixture("benchmarks/we_moe_forward.py")


def test_batched_variants_equal_the_loop(bench):
    args = bench.parse_args(TINY)
    names = ["naive_batched"] + (["wemoe"] if bench.wemoe_class() is not None else [])
    checks = bench.check_against_loop(names, bench.selected_shape(args), args)
    assert set(checks) == set(names)
    for check in checks.values():
        assert check["max_abs_diff"] <= 1e-5
        assert check["router_grad_max_abs_diff"] is not None and check["router_grad_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("worker", ["dense:inference", "loop:tta"])
def test_measurement_fields(bench, worker):
    args = bench.parse_args([*TINY, "--warmup", "0", "--iters", "1", "--_worker", worker])
    result = bench.measure(args)
    key = "ms_per_step" if worker.endswith("tta") else "ms_per_batch"
    assert {key, "ms_all", "images_per_s", "peak_memory_mib", "weights_mib"} <= set(result)
    assert result[key] > 0 and result["peak_memory_mib"] >= 0 and result["weights_mib"] > 0


def test_ratios_and_goals(bench):
    inference = {
        "dense": {"ms_per_batch": 10.0, "peak_memory_mib": 5.0},
        "loop": {"ms_per_batch": 100.0, "peak_memory_mib": 9.0},
        "wemoe": {"ms_per_batch": 20.0, "peak_memory_mib": 6.0},
    }
    tta = {
        "loop": {"ms_per_step": 100.0, "peak_memory_mib": 90.0},
        "wemoe": {"ms_per_step": 50.0, "peak_memory_mib": 9.0},
    }
    bench.add_ratios(inference, "inference")
    bench.add_ratios(tta, "tta")
    assert inference["wemoe"]["speed_vs_loop"] == pytest.approx(5.0)
    assert inference["wemoe"]["speed_vs_dense"] == pytest.approx(0.5)
    assert tta["wemoe"]["peak_memory_vs_loop"] == pytest.approx(0.1)
    assert bench.goals(inference, tta)["met"] is True

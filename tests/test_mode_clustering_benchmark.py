"""Smoke test of benchmarks/mode_clustering.py at a tiny size: the fields of each measurement, our clusters within
their bounds, faiss reported unavailable when it cannot be imported. No timing assertions."""

import sys

import pytest
import torch

from helpers import script_fixture


TINY = ["--num_points", "300", "--num_clusters", "8", "--dim", "16", "--num_iters", "3"]


bench = script_fixture("benchmarks/mode_clustering.py")


def test_points_are_unit_vectors_and_reproducible(bench):
    points = bench.clustered_points(300, 16, 8)
    torch.testing.assert_close(points.norm(dim=-1), torch.ones(300))
    assert torch.equal(points, bench.clustered_points(300, 16, 8))


def test_balanced_kmeans_measurement(bench):
    result = bench.measure(bench.parse_args(TINY), "balanced_kmeans")
    assert result["within_bounds"] is True
    low, high = result["size_bounds"]
    assert (low, high) == (33, 41)  # floor(0.9 * 37.5), floor(1.1 * 37.5)
    assert low <= result["min_cluster_size"] <= result["max_cluster_size"] <= high
    assert result["max_over_average"] == pytest.approx(result["max_cluster_size"] / 37.5)
    assert result["seconds"] > 0 and result["peak_memory_mib"] >= 0 and 0 < result["inertia"] < 4


def test_minibatch_and_assignment_measurements(bench):
    args = bench.parse_args(TINY)
    minibatch = bench.measure(args, "minibatch_kmeans")
    assert {"seconds", "peak_memory_mib", "max_cluster_size", "min_cluster_size", "inertia"} <= set(minibatch)
    assert minibatch["inertia"] > 0
    assignment = bench.measure(args, "nearest_centers")
    assert assignment["points_per_s"] == pytest.approx(300 / assignment["seconds"])


def test_faiss_reported_unavailable_without_faiss(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    args = bench.parse_args(TINY)
    for name in ("faiss", "faiss_index"):
        assert bench.measure(args, name) == {
            "available": False,
            "error": "faiss is not installed (pip install faiss-cpu)",
        }
    clustering = {"balanced_kmeans": {"seconds": 1.0, "inertia": 0.5, "max_over_average": 1.05}, "faiss": {}}
    ratios = bench.vs_faiss(clustering, {})
    assert ratios == {}
    assert bench.goals(clustering, ratios, "cpu")["met"] is False


def test_faiss_measurement_when_installed(bench):
    if bench.faiss_module() is None:
        # Without faiss the optional path is covered by the test above; here only its absence is confirmed.
        with pytest.raises(ImportError):
            import faiss  # noqa: F401
        return
    result = bench.measure(bench.parse_args(TINY), "faiss")
    assert result["available"] is True and result["training_sample"] == 300
    assert result["min_cluster_size"] >= 0 and result["inertia"] > 0


def test_ratios_and_goals(bench):
    clustering = {
        "balanced_kmeans": {"seconds": 30.0, "inertia": 0.5, "peak_memory_mib": 10.0, "max_cluster_size": 210,
                            "max_over_average": 1.05},
        "faiss": {"seconds": 20.0, "inertia": 0.4, "peak_memory_mib": 5.0, "max_cluster_size": 2100},
    }  # fmt: skip
    assignment = {"nearest_centers": {"points_per_s": 100.0}, "faiss_index": {"points_per_s": 50.0}}
    ratios = bench.vs_faiss(clustering, assignment)
    assert ratios == pytest.approx(
        {"time": 1.5, "inertia": 1.25, "peak_memory": 2.0, "max_cluster_size": 0.1, "assignment_throughput": 2.0}
    )
    assert bench.goals(clustering, ratios, "cpu")["met"] is True
    assert bench.goals(clustering, {**ratios, "time": 2.5}, "cpu")["met"] is False

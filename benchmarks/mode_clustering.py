# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Speed, memory, balance and inertia of MoDE's fine clustering: hf_moe's balanced k-means against faiss and
scikit-learn's MiniBatchKMeans, plus the throughput of the nearest-center assignment.

The data stand in for MoDE's caption embeddings: `--num_points` (200k) L2-normalised `--dim` (768) vectors drawn
from a mixture of 2 x `--num_clusters` Gaussians around random directions on the sphere, with very uneven mixture
weights (uniform^3), fixed seed. Every method clusters them into `--num_clusters` (1024) clusters:

* `balanced_kmeans`: `hf_moe.clustering.balanced_kmeans` (tolerance `--tolerance`, 0.1; `--num_iters`, 25);
* `faiss`: `faiss.Kmeans` (unbalanced; 25 iterations, faiss's default of at most 256 points per centroid, so it
  trains on a sample of min(N, 256 K) points; the labels of all points come from a flat index search);
* `minibatch_kmeans`: scikit-learn's `MiniBatchKMeans` (batch 4096, k-means++ init, at most 25 epochs, its
  default early stopping).

For each: wall time, peak memory, cluster sizes (min, max, max / (N/K)), inertia (mean squared distance of a point
to the center of its cluster, computed the same way for all). Assignment: points per second of
`hf_moe.clustering.nearest_centers` for N points against the K centers, and of a faiss `IndexFlatL2` search.
Ratios against faiss are in `vs_faiss`. faiss is optional (`pip install hf-moe[bench]`): when it cannot be
imported it is reported as unavailable.

Every measurement runs in a FRESH subprocess (the data regenerated there), so that peak memory is per method: on
CPU the peak resident size during the measurement minus the resident size just before it (`VmHWM`, reset
through `/proc/self/clear_refs`; glibc's mmap threshold fixed at 64 KiB so freed buffers leave the resident set),
i.e. memory on top of the N x D points; on CUDA `torch.cuda.max_memory_allocated` minus the allocated memory before.

One JSON object goes to stdout, progress to stderr:

    python benchmarks/mode_clustering.py                                  # CPU, 200k points (minutes)
    python benchmarks/mode_clustering.py --num_points 1000000 --device cuda
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from hf_moe.clustering import balanced_kmeans, balanced_size_bounds, nearest_centers


# This script's folder is on sys.path when it runs as a script, not when a test loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import log, peak_since, report_header, reset_peak, run_worker, synchronize, write_report  # noqa: E402


SEED = 0
METHODS = ("balanced_kmeans", "faiss", "minibatch_kmeans")
ASSIGNERS = ("nearest_centers", "faiss_index")


def clustered_points(num_points: int, dim: int, num_clusters: int, seed: int = SEED) -> torch.Tensor:
    """`(num_points, dim)` unit vectors from an unevenly weighted mixture of Gaussians on the sphere."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(2 * num_clusters, dim, generator=generator), dim=-1)
    weights = torch.rand(2 * num_clusters, generator=generator) ** 3
    component = torch.multinomial(weights, num_points, replacement=True, generator=generator)
    noise = torch.randn(num_points, dim, generator=generator).mul_(0.03)
    return torch.nn.functional.normalize(noise.add_(directions[component]), dim=-1)


def faiss_module():
    """faiss, or None when it is not installed (it is an optional extra)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def inertia(points: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, chunk_size: int = 65536) -> float:
    """Mean squared distance of every point to the center of its cluster."""
    total = 0.0
    for start in range(0, len(points), chunk_size):
        chunk = points[start : start + chunk_size]
        total += (chunk - centers[labels[start : start + chunk_size]]).square().sum().item()
    return total / len(points)


# ----------------------------------------------------------------------------------------------------------
# The methods (each returns labels and centers as CPU torch tensors)
# ----------------------------------------------------------------------------------------------------------


def run_balanced_kmeans(points, args):
    labels, centers = balanced_kmeans(
        points, args.num_clusters, tolerance=args.tolerance, num_iters=args.num_iters, seed=SEED,
        device=args.device, progress=False,
    )  # fmt: skip
    return labels.cpu(), centers.cpu()


def run_faiss(points, args):
    faiss = faiss_module()
    data = points.numpy()
    kmeans = faiss.Kmeans(data.shape[1], args.num_clusters, niter=args.num_iters, seed=SEED, verbose=False)
    kmeans.train(data)
    _, labels = kmeans.index.search(data, 1)
    return torch.from_numpy(labels[:, 0]).long(), torch.from_numpy(kmeans.centroids)


def run_minibatch_kmeans(points, args):
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(args.num_clusters, batch_size=4096, max_iter=args.num_iters, n_init=1, random_state=SEED)
    labels = model.fit_predict(points.numpy())
    return torch.from_numpy(labels).long(), torch.from_numpy(model.cluster_centers_).float()


RUNNERS = {"balanced_kmeans": run_balanced_kmeans, "faiss": run_faiss, "minibatch_kmeans": run_minibatch_kmeans}


# ----------------------------------------------------------------------------------------------------------
# Measurement (in a fresh process per method)
# ----------------------------------------------------------------------------------------------------------


def measure(args, name: str) -> dict:
    """Cluster (or, for an assigner, assign) the benchmark's points with one method, in this process."""
    if name in ("faiss", "faiss_index") and faiss_module() is None:
        return {"available": False, "error": "faiss is not installed (pip install faiss-cpu)"}
    points = clustered_points(args.num_points, args.dim, args.num_clusters)
    # Only our method runs on an accelerator; faiss-cpu and scikit-learn are CPU libraries.
    device = torch.device(args.device if name in ("balanced_kmeans", "nearest_centers") else "cpu")
    if name in ASSIGNERS:
        generator = torch.Generator().manual_seed(SEED + 1)
        centers = points[torch.randperm(len(points), generator=generator)[: args.num_clusters]]
        if name == "nearest_centers":
            centers = centers.to(device)
        index = None
        if name == "faiss_index":
            index = faiss_module().IndexFlatL2(args.dim)
            index.add(centers.numpy())
        baseline = reset_peak(device)
        start = time.perf_counter()
        if index is None:
            labels, _ = nearest_centers(points, centers)
        else:
            index.search(points.numpy(), 1)
        synchronize(device)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "points_per_s": len(points) / seconds,
            "peak_memory_mib": peak_since(device, baseline),
        }

    baseline = reset_peak(device)
    start = time.perf_counter()
    labels, centers = RUNNERS[name](points, args)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_since(device, baseline)
    sizes = torch.bincount(labels, minlength=args.num_clusters)
    average = args.num_points / args.num_clusters
    result = {
        "available": True,
        "seconds": seconds,
        "peak_memory_mib": peak,
        "min_cluster_size": sizes.min().item(),
        "max_cluster_size": sizes.max().item(),
        "max_over_average": sizes.max().item() / average,
        "min_over_average": sizes.min().item() / average,
        "inertia": inertia(points, labels, centers.float()),
    }
    if name == "balanced_kmeans":
        low, high = balanced_size_bounds(args.num_points, args.num_clusters, args.tolerance)
        result["size_bounds"] = [low, high]
        result["within_bounds"] = bool(low <= result["min_cluster_size"] and result["max_cluster_size"] <= high)
    if name == "faiss":
        result["training_sample"] = min(args.num_points, 256 * args.num_clusters)
    return result


def run_method(name: str, argv: list[str]) -> dict:
    log(f"[{name}] fresh process")
    result = run_worker(__file__, argv, name)
    if "error" not in result:
        log(f"[{name}] {json.dumps(result)}")
    return result


def vs_faiss(clustering: dict, assignment: dict) -> dict:
    """Our figures divided by faiss's (time: > 1 is slower than faiss)."""
    ours, faiss = clustering.get("balanced_kmeans", {}), clustering.get("faiss", {})
    ratios = {}
    if ours.get("seconds") and faiss.get("seconds"):
        ratios["time"] = ours["seconds"] / faiss["seconds"]
        ratios["inertia"] = ours["inertia"] / faiss["inertia"]
        ratios["peak_memory"] = ours["peak_memory_mib"] / max(faiss["peak_memory_mib"], 1e-9)
        ratios["max_cluster_size"] = ours["max_cluster_size"] / faiss["max_cluster_size"]
    if assignment.get("nearest_centers", {}).get("points_per_s") and assignment.get("faiss_index", {}).get(
        "points_per_s"
    ):
        ratios["assignment_throughput"] = (
            assignment["nearest_centers"]["points_per_s"] / assignment["faiss_index"]["points_per_s"]
        )
    return ratios


def goals(clustering: dict, ratios: dict, device: str) -> dict:
    ours = clustering.get("balanced_kmeans", {})
    if device.startswith("cuda"):
        return {"seconds <= 30 (1M points, H100)": ours.get("seconds"), "met": bool(ours.get("seconds", 1e9) <= 30)}
    return {
        "time_vs_faiss <= 2": ratios.get("time"),
        "max_over_average <= 1.1": ours.get("max_over_average"),
        "met": bool(ratios.get("time", 1e9) <= 2 and ours.get("max_over_average", 1e9) <= 1.1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_points", type=int, default=200_000)
    parser.add_argument("--num_clusters", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tolerance", type=float, default=0.1, help="balance tolerance of balanced_kmeans")
    parser.add_argument("--num_iters", type=int, default=25, help="iterations (faiss, ours) / epochs (minibatch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--skip_assignment", action="store_true")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.num_clusters <= args.num_points:
        parser.error(f"--num_clusters={args.num_clusters} must be between 1 and --num_points={args.num_points}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(args, args._worker)))
        return
    clustering = {name: run_method(name, argv) for name in args.methods}
    assignment = {} if args.skip_assignment else {name: run_method(name, argv) for name in ASSIGNERS}
    ratios = vs_faiss(clustering, assignment)
    faiss = faiss_module()
    report = {
        **report_header("mode_clustering.py", argv, torch.device(args.device)),
        "faiss": getattr(faiss, "__version__", "unavailable") if faiss else "unavailable",
        "load_average": os.getloadavg(),
        "data": {
            "num_points": args.num_points,
            "dim": args.dim,
            "kind": f"unit vectors, mixture of {2 * args.num_clusters} Gaussians (std 0.03), weights uniform^3",
        },
        "num_clusters": args.num_clusters,
        "tolerance": args.tolerance,
        "num_iters": args.num_iters,
        "memory_method": (
            "fresh subprocess per method; CPU: peak resident size (VmHWM reset through /proc/self/clear_refs) during "
            "the run minus the resident size before it (points excluded), MALLOC_MMAP_THRESHOLD_=65536; "
            "CUDA: max_memory_allocated minus allocated"
        ),
        "clustering": clustering,
        "assignment": assignment,
        "vs_faiss": ratios,
        "goals": goals(clustering, ratios, args.device),
    }
    write_report(report)


if __name__ == "__main__":
    main()

"""Balanced k-means and the chunked nearest-center search of hf_moe.clustering: chunking changes nothing, the
constraint-free case is plain Lloyd, the price-based assignment is near the exact optimum, the size bounds hold
on unbalanced data, memory never holds an N x K block, runs are reproducible and bad input is named."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_moe import clustering
from hf_moe.clustering import balanced_kmeans, balanced_size_bounds, nearest_centers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: on a shared 2-core machine thread hand-offs cost more than the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unbalanced_blobs(sizes=(400, 50, 30, 200, 20, 300), dim=8, spread=0.3, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(len(sizes), dim, generator=generator)
    return torch.cat([c + spread * torch.randn(n, dim, generator=generator) for c, n in zip(centers, sizes)])


def initial_centers(points: torch.Tensor, num_clusters: int, seed: int) -> torch.Tensor:
    """The documented initialisation: distinct points drawn by torch.randperm under the seed."""
    generator = torch.Generator().manual_seed(seed)
    return points[torch.randperm(len(points), generator=generator)[:num_clusters].sort().values].float()


def test_nearest_centers_matches_brute_force_for_half_points_and_any_chunk():
    points = unbalanced_blobs(dim=16).half()
    centers = torch.randn(37, 16)
    expected = torch.cdist(points.float().double(), centers.double()).square()
    for chunk_size in (7, 10_000):
        labels, distances = nearest_centers(points, centers, chunk_size=chunk_size)
        torch.testing.assert_close(distances.double(), expected.min(dim=1).values, rtol=1e-4, atol=1e-4)
        assert torch.equal(labels, expected.argmin(dim=1))
    labels, _ = nearest_centers(points, centers, chunk_size=7, normalize=True)
    unit = torch.nn.functional.normalize(points.float(), dim=-1)
    assert torch.equal(labels, torch.cdist(unit.double(), centers.double()).argmin(dim=1))


@pytest.mark.parametrize(("num_clusters", "tolerance", "normalize"), [(6, 0.1, False), (37, 0.05, True)])
def test_chunked_equals_unchunked(num_clusters, tolerance, normalize):
    points = unbalanced_blobs()
    runs = [
        balanced_kmeans(
            points, num_clusters, tolerance=tolerance, num_iters=10, chunk_size=c, normalize=normalize, progress=False
        )
        for c in (7, len(points))
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_without_active_constraint_it_is_lloyd_from_the_same_init():
    # Balanced blobs and a tolerance that no partition can violate: prices and repair must leave Lloyd alone.
    points = unbalanced_blobs(sizes=(60,) * 5, spread=0.5)
    num_clusters = 8  # more clusters than blobs, so Lloyd has real work splitting them
    labels, centers = balanced_kmeans(points, num_clusters, tolerance=100.0, num_iters=50, seed=3, progress=False)

    reference = initial_centers(points, num_clusters, seed=3)
    for _ in range(50):
        reference_labels = torch.cdist(points, reference).argmin(dim=1)
        reference = torch.stack(
            [points[reference_labels == k].mean(0) if (reference_labels == k).any() else reference[k] for k in range(8)]
        )
    assert torch.equal(labels, reference_labels)
    torch.testing.assert_close(centers, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("sizes", "num_clusters", "seed", "dim"), [((320,), 8, 0, 2), ((320,), 16, 1, 3), ((200, 120), 10, 2, 2)]
)
def test_balanced_assignment_is_near_the_exact_optimum(sizes, num_clusters, seed, dim):
    """With one iteration the labels are the balanced assignment to the initial centers; tolerance 0 and N = m K
    make it a linear assignment problem (each center replicated m times), solved exactly by scipy. The prices do
    the work here: the repair alone (no price rounds) lands 29-65% above the optimum on these cases."""
    from scipy.optimize import linear_sum_assignment

    points = unbalanced_blobs(sizes=sizes, dim=dim, spread=1.0)
    per_cluster = len(points) // num_clusters
    labels, _ = balanced_kmeans(points, num_clusters, tolerance=0.0, num_iters=1, seed=seed, progress=False)
    init = initial_centers(points, num_clusters, seed=seed)
    cost = torch.cdist(points.double(), init.double()).square()  # (N, K)
    rows, columns = linear_sum_assignment(cost.repeat_interleave(per_cluster, dim=1).numpy())
    optimum = cost[rows, columns // per_cluster].sum().item()
    ours = cost[torch.arange(len(points)), labels].sum().item()
    assert torch.bincount(labels, minlength=num_clusters).unique().tolist() == [per_cluster]
    assert optimum - 1e-6 <= ours <= 1.1 * optimum, (ours, optimum)


@pytest.mark.parametrize(
    ("num_points", "num_clusters", "tolerance"),
    [(1010, 6, 0.1), (1010, 10, 0.0), (1010, 37, 0.05), (1010, 100, 0.0), (333, 64, 0.2), (97, 97, 0.0)],
)
def test_sizes_within_bounds_on_unbalanced_data(num_points, num_clusters, tolerance):
    points = unbalanced_blobs(sizes=(num_points - 7 * (num_points // 10), *(num_points // 10 * (5, 1, 1))))
    low, high = balanced_size_bounds(num_points, num_clusters, tolerance)
    labels, centers = balanced_kmeans(points, num_clusters, tolerance=tolerance, num_iters=5, progress=False)
    sizes = torch.bincount(labels, minlength=num_clusters)
    assert low <= sizes.min().item() and sizes.max().item() <= high, (sizes.min().item(), sizes.max().item())
    if tolerance == 0:
        assert sizes.max() - sizes.min() <= 1
    # The returned centers are the means of the returned clusters.
    means = torch.stack([points[labels == k].mean(0) for k in range(num_clusters)])
    torch.testing.assert_close(centers, means, rtol=1e-4, atol=1e-4)


def test_size_bounds_never_exceed_the_tolerance_when_feasible():
    assert balanced_size_bounds(1000, 3, 0.0) == (333, 334)
    assert balanced_size_bounds(1000, 10, 0.1) == (90, 110)
    assert balanced_size_bounds(1005, 10, 0.1) == (90, 110)  # 90.45 -> 90, 110.55 -> 110
    assert balanced_size_bounds(200_000, 1024, 0.1) == (175, 214)  # 175.78 -> 175, 214.84 -> 214 (MoDE's goal)
    assert balanced_size_bounds(10, 3, 2.0) == (0, 10)
    # floor(1.02 x 10.5) = 10 < ceil(10.5): the upper bound rises to the smallest feasible one.
    assert balanced_size_bounds(105, 10, 0.02) == (10, 11)
    assert balanced_size_bounds(1009, 10, 0.001) == (100, 101)  # floor(101.0009) = 101 = ceil(100.9)
    assert balanced_size_bounds(1005, 10, 0.001) == (100, 101)  # floor(100.6) = 100 < ceil(100.5) = 101
    for num_points, num_clusters, tolerance in [(1005, 10, 0.1), (333, 64, 0.2), (97, 97, 0.0), (10**6, 1024, 0.1)]:
        low, high = balanced_size_bounds(num_points, num_clusters, tolerance)
        assert low * num_clusters <= num_points <= high * num_clusters
        average = num_points / num_clusters
        assert high <= (1 + tolerance) * average or high == -(-num_points // num_clusters)


class LargestOutputs(TorchDispatchMode):
    """Records the numel of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.sizes.append(tuple(tensor.shape))
        return out


def test_memory_is_chunk_by_clusters_never_points_by_clusters():
    num_points, num_clusters, chunk_size = 4000, 64, 100
    points = unbalanced_blobs(sizes=(3000, 500, 300, 200), dim=4)
    with LargestOutputs() as recorder:
        labels, _ = balanced_kmeans(
            points, num_clusters, tolerance=0.0, num_iters=2, chunk_size=chunk_size, progress=False
        )
    assert torch.bincount(labels).max() - torch.bincount(labels).min() <= 1  # the repair path ran too
    numels = [torch.Size(s).numel() for s in recorder.sizes]
    with_clusters = [torch.Size(s).numel() for s in recorder.sizes if num_clusters in s]
    assert max(with_clusters) <= chunk_size * num_clusters
    # Nothing bigger than the per-point candidate lists (N x 16), far below N x K.
    assert max(numels) <= num_points * clustering.NUM_CANDIDATES < num_points * num_clusters


def test_host_half_points_computed_on_a_device_match_fp32():
    points = unbalanced_blobs(dim=16)
    half = points.half()
    labels, centers = balanced_kmeans(half, 12, num_iters=5, device="cpu", progress=False)
    reference, reference_centers = balanced_kmeans(half.float(), 12, num_iters=5, progress=False)
    assert torch.equal(labels, reference) and torch.equal(centers, reference_centers)


def test_deterministic_under_the_seed():
    points = unbalanced_blobs()
    first = balanced_kmeans(points, 20, seed=5, num_iters=5, progress=False)
    second = balanced_kmeans(points, 20, seed=5, num_iters=5, progress=False)
    other = balanced_kmeans(points, 20, seed=6, num_iters=5, progress=False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_bad_input_is_named():
    points = torch.randn(4, 3)
    with pytest.raises(ValueError, match="num_clusters=5"):
        balanced_kmeans(points, 5, progress=False)
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        balanced_kmeans(points, 2, tolerance=-0.1, progress=False)
    points[3, 1] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        balanced_kmeans(points, 2, chunk_size=2, progress=False)


def test_nearest_center_with_room_from_candidates_matches_brute_force():
    """The repair looks a point's nearest center with room up in its candidate lists and passes over the data only
    for the points whose candidates are all full; both paths must give the brute-force answer."""
    points = unbalanced_blobs(dim=6)
    centers = initial_centers(points, 40, seed=1)
    norms = points.square().sum(-1)
    index, distance = clustering._candidates(points, norms, centers, 4, 64, torch.device("cpu"), False)
    room = torch.arange(40) % 2  # every other center full: most points keep a candidate with room, some do not
    rows = torch.arange(len(points))
    target, partial = clustering._nearest_with_room(
        points, norms, rows, index, distance, centers, room, 64, torch.device("cpu"), False
    )
    brute = torch.cdist(points.double(), centers.double()).square().masked_fill(room[None] <= 0, float("inf"))
    has_candidate = (room[index] > 0).any(dim=1)
    assert has_candidate.any() and not has_candidate.all()  # both paths ran
    assert torch.equal(target, brute.argmin(dim=1))
    torch.testing.assert_close((partial + norms).double(), brute.min(dim=1).values, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# One interface for the back-ends


# The keyword arguments every clustering back-end takes.
COMMON = {"num_iters": 5, "seed": 3, "chunk_size": 97, "device": "cpu", "normalize": False, "progress": False}


@pytest.mark.parametrize("method", ["kmeans", "balanced_kmeans"])
def test_cluster_runs_each_backend_by_name_with_the_same_arguments_and_results(method):
    points = unbalanced_blobs()
    labels, centers = clustering.cluster(points, 6, method=method, **COMMON)
    direct = clustering.CLUSTERING_METHODS[method](points, 6, **COMMON)
    assert torch.equal(labels, direct[0]) and torch.equal(centers, direct[1])
    assert labels.shape == (len(points),) and labels.dtype == torch.long
    assert centers.shape == (6, points.shape[1]) and centers.dtype == torch.float32
    # normalize: the same as clustering the L2-normalised points
    normalized = clustering.cluster(points, 6, method=method, **{**COMMON, "normalize": True})
    reference = clustering.cluster(torch.nn.functional.normalize(points, dim=-1), 6, method=method, **COMMON)
    assert torch.equal(normalized[0], reference[0])
    with pytest.raises(ValueError, match="Unknown clustering method 'dbscan'; one of: kmeans, balanced_kmeans"):
        clustering.cluster(points, 6, method="dbscan")


def test_kmeans_defaults_are_unchanged_by_the_common_arguments():
    points = unbalanced_blobs()
    plain = clustering.kmeans(points, 6, seed=1)
    placed = clustering.kmeans(points.numpy(), 6, seed=1, device="cpu", normalize=False, progress=True)
    assert torch.equal(plain[0], placed[0]) and torch.equal(plain[1], placed[1])


def test_assign_backends_agree_and_auto_takes_faiss_only_when_installed(monkeypatch):
    points = unbalanced_blobs()
    centers = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:7]]
    expected = nearest_centers(points, centers, chunk_size=50)
    got = clustering.assign(points, centers, backend="torch", chunk_size=50)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    if clustering.faiss_available():
        assert clustering.assignment_backend("auto", centers) == "faiss"
        labels, distances = clustering.assign(points, centers, backend="faiss", chunk_size=50)
        assert torch.equal(labels, expected[0])
        torch.testing.assert_close(distances, expected[1], rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert clustering.assignment_backend("auto", centers) == "torch"
    assert torch.equal(clustering.assign(points, centers)[0], expected[0])
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        clustering.assign(points, centers, backend="faiss")
    with pytest.raises(ValueError, match="Unknown assignment backend 'annoy'"):
        clustering.assign(points, centers, backend="annoy")

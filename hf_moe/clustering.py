"""k-means and balanced k-means on feature matrices, in torch so they run on the GPU that extracted the features.

Written by hand: scikit-learn's KMeans is CPU-only and not a core dependency, and the balanced k-means packages
on PyPI do not scale to MoDE's sizes (k-means-constrained takes about a minute per iteration for 100k points
into 256 clusters; the MoDE reference broadcasts an N x K x D tensor). Distances are computed in chunks so
memory stays O(chunk x K) whatever the number of points.

One interface for the back-ends, as callers choose them by name:

- `cluster(points, num_clusters, method=...)`: `kmeans` (Lloyd, k-means++ init) or `balanced_kmeans` (cluster
  sizes bounded, `tolerance`), each taking `(points, num_clusters, *, num_iters, seed, chunk_size, device,
  normalize, progress)` plus its own options, and returning `(labels, centers)`: `(N,)` long and `(K, dim)` fp32
  (`CLUSTERING_METHODS`).
- `assign(points, centers, backend=...)`: the nearest center of every point, `(labels, squared_distances)`:
  `torch` (`nearest_centers`, chunked, on the centers' device) or `faiss` (`faiss_nearest_centers`, an exact
  `IndexFlatL2` search, CPU; faiss-cpu is in the `bench` extra). `auto`, the default, takes faiss when it is
  installed and the centers are on the CPU, torch otherwise (`ASSIGNMENT_BACKENDS`).
"""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Balanced k-means keeps, per point, the distances to its nearest few centers: the price rounds only move a point
# among those, so they cost O(N x candidates) instead of a pass over the data per round.
NUM_CANDIDATES = 16
SINKHORN_ROUNDS = 20
SINKHORN_TEMPERATURE = 0.05
SINKHORN_CHECK_EVERY = 5
# Lloyd stops early once fewer than this fraction of the points change cluster in an iteration.
CONVERGED_FRACTION = 1e-3


def _as_tensor(points) -> torch.Tensor:
    points = torch.as_tensor(points)
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-D (num_points, dim) matrix, got shape {tuple(points.shape)}.")
    return points


def _iter_chunks(points: torch.Tensor, chunk_size: int, device: torch.device, normalize: bool = False):
    """`(start, fp32 chunk on device)`: only one chunk of a (possibly half-precision, host-side) matrix is ever
    converted or moved at a time."""
    for start in range(0, points.shape[0], chunk_size):
        chunk = points[start : start + chunk_size].to(device=device, dtype=torch.float32)
        yield start, (F.normalize(chunk, dim=-1) if normalize else chunk)


def _partial_distances(chunk: torch.Tensor, centers: torch.Tensor, center_norms: torch.Tensor) -> torch.Tensor:
    """`||c||^2 - 2 x.c`, `(chunk, k)`: the squared distance less `||x||^2`, which does not change a point's
    ranking of the centers and is added only to the few values kept."""
    return torch.addmm(center_norms, chunk, centers.T, alpha=-2)


def nearest_centers(
    points: torch.Tensor, centers: torch.Tensor, chunk_size: int = 65536, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest center and the squared euclidean distance to it, for every point.

    Memory is O(chunk_size x num_centers): the points (any dtype, any device, e.g. fp16 on the host) are moved to
    the centers' device and converted to fp32 one chunk at a time.

    Args:
        points: `(num_points, dim)` matrix (torch tensor or numpy array).
        centers: `(num_centers, dim)` matrix; the computation runs on its device.
        chunk_size: points per distance block.
        normalize: L2-normalise each point first (MoDE stores raw caption embeddings).
    Returns:
        `(labels, squared_distances)`: `(num_points,)` long and fp32 tensors on the centers' device.
    """
    points = _as_tensor(points)
    centers = centers.float()
    center_norms = centers.square().sum(-1)
    labels = torch.empty(points.shape[0], dtype=torch.long, device=centers.device)
    distances = torch.empty(points.shape[0], dtype=torch.float32, device=centers.device)
    for start, chunk in _iter_chunks(points, chunk_size, centers.device, normalize):
        best = _partial_distances(chunk, centers, center_norms).min(dim=-1)
        labels[start : start + len(chunk)] = best.indices
        distances[start : start + len(chunk)] = (best.values + chunk.square().sum(-1)).clamp(min=0)
    return labels, distances


def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    num_iters: int = 100,
    seed: int = 0,
    tol: float = 1e-6,
    chunk_size: int = 65536,
    *,
    device=None,
    normalize: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ initialisation.

    Args:
        points: `(num_points, dim)` features (torch tensor or numpy array, any device; computed in fp32).
        num_clusters: k.
        num_iters: at most this many Lloyd iterations (fewer once the inertia improves by less than `tol`).
        seed: seed of the k-means++ draws.
        chunk_size: points per distance block.
        device: where to compute (default: the points' device); the points are moved there whole.
        normalize: L2-normalise each point first.
        progress: accepted for the common interface (`cluster`); k-means shows no bar.
    Returns:
        `(labels, centers)`: `(num_points,)` long cluster ids and `(k, dim)` fp32 centers.
    """
    points = _as_tensor(points)
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of points ({points.shape[0]}).")
    points = points.float() if device is None else points.to(device=device, dtype=torch.float32)
    if normalize:
        points = F.normalize(points, dim=-1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randint(points.shape[0], (1,), generator=generator).item()
    centers = points[first : first + 1]
    for _ in range(1, num_clusters):
        _, distances = nearest_centers(points, centers, chunk_size)
        probs = (distances / distances.sum()) if distances.sum() > 0 else torch.ones_like(distances)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).item()
        centers = torch.cat([centers, points[nxt : nxt + 1]])

    previous_inertia = float("inf")
    for _ in range(num_iters):
        labels, distances = nearest_centers(points, centers, chunk_size)
        counts = torch.bincount(labels, minlength=num_clusters).float()
        sums = torch.zeros_like(centers).index_add_(0, labels, points)
        # An empty cluster keeps its old center rather than collapsing to the origin.
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        inertia = distances.sum().item()
        if previous_inertia - inertia <= tol * max(previous_inertia, 1e-12):
            break
        previous_inertia = inertia
    labels, _ = nearest_centers(points, centers, chunk_size)
    return labels, centers


# ----------------------------------------------------------------------------------------------------------
# Balanced k-means
# ----------------------------------------------------------------------------------------------------------


def balanced_size_bounds(num_points: int, num_clusters: int, tolerance: float) -> tuple[int, int]:
    """`(low, high)` = `(floor((1 - tolerance) N / K), max(ceil(N / K), floor((1 + tolerance) N / K)))`, low at
    least 0 (the products rounded to 9 decimals before floor).

    The upper bound rounds down, so that a promise of "at most (1 + tolerance) N / K points per cluster" holds
    exactly; it rises to ceil(N / K) only where rounding down would leave no feasible partition (high x K < N).
    Both bounds are feasible (low x K <= N <= high x K) for every N, K; tolerance=0 gives `(N // K, ceil(N / K))`,
    i.e. cluster sizes differing by at most one (computed in integers, so exactly).
    """
    smallest_high = -(-num_points // num_clusters)
    if tolerance == 0:
        return num_points // num_clusters, smallest_high
    average = num_points / num_clusters
    # Rounded to 9 decimals first, so that float noise (1.1 * 100 = 110.00000000000001) does not move a bound.
    low, high = round((1 - tolerance) * average, 9), round((1 + tolerance) * average, 9)
    return max(0, math.floor(low)), max(smallest_high, math.floor(high))


def _group_order(values: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """Elements ordered by group, then by value within the group: `(order, rank_in_group, group_starts,
    group_counts)`, `rank_in_group` indexed like `values`."""
    by_value = torch.argsort(values)
    order = by_value[torch.argsort(groups[by_value], stable=True)]
    counts = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[groups[order]]
    return order, rank, starts, counts


def _candidates(points, norms, centers, num_candidates, chunk_size, device, normalize):
    """One pass over the data: each point's `num_candidates` nearest centers and squared distances to them."""
    center_norms = centers.square().sum(-1)
    index = torch.empty(points.shape[0], num_candidates, dtype=torch.long, device=device)
    distance = torch.empty(points.shape[0], num_candidates, dtype=torch.float32, device=device)
    # One distance block reused by every chunk: a fresh (chunk, k) allocation per chunk is returned to the OS and
    # page-faulted in again each time (measured: 15 % of the pass on a CPU).
    block = torch.empty(min(chunk_size, points.shape[0]), len(centers), dtype=torch.float32, device=device)
    for start, chunk in _iter_chunks(points, chunk_size, device, normalize):
        end = start + len(chunk)
        partial = torch.addmm(center_norms, chunk, centers.T, alpha=-2, out=block[: len(chunk)])
        torch.topk(partial, num_candidates, dim=-1, largest=False, out=(distance[start:end], index[start:end]))
        distance[start:end] += norms[start:end, None]
    return index, distance


def _balanced_assignment(index, distance, prices, low, high, num_rounds):
    """Assignment with cluster sizes (nearly) within [low, high], by per-cluster prices found with Sinkhorn
    iterations restricted to each point's candidate centers.

    Each point is assigned to the candidate minimising `distance + price`. The prices are the column potentials of
    an entropic transport problem: in each round every point spreads a unit of mass over its candidates with a
    softmin of `(distance + price) / temperature`, and a cluster whose mass is above `high` (below `low`) raises
    (lowers) its price by `temperature * log(mass / bound)`, the KL projection onto the size bounds. This is a
    smooth, damped form of an auction's price updates (an exact auction was tried: its price wars took hundreds of
    sorting rounds per iteration at 50k points): every round costs O(N x candidates) with no sorting,
    and the rounds stop as soon as the hard assignment meets the bounds. What is left over is fixed by the exact
    repair. Prices carry over between Lloyd iterations. Returns the labels, their positions in the candidate
    lists and the prices.
    """
    num_clusters = len(prices)
    temperature = SINKHORN_TEMPERATURE * (distance[:, -1] - distance[:, 0]).mean().clamp(min=1e-12)
    flat_index = index.flatten()
    for round_ in range(num_rounds + 1):
        cost = distance + prices[index]
        if round_ % SINKHORN_CHECK_EVERY == 0 or round_ == num_rounds:
            position = cost.argmin(dim=1)
            labels = index.gather(1, position[:, None]).squeeze(1)
            counts = torch.bincount(labels, minlength=num_clusters)
            if round_ == num_rounds or (counts.min() >= low and counts.max() <= high):
                break
        mass = torch.zeros(num_clusters, device=index.device)
        mass.index_add_(0, flat_index, torch.softmax(cost / -temperature, dim=1).flatten())
        # A cluster that (almost) no point lists as a candidate cannot be filled by prices, only by the repair: its
        # price is left alone rather than cut without bound (it would then swallow its neighbours once it moves).
        listed = mass > 1e-3
        mass = mass.clamp(min=1e-3)
        step = temperature * (mass.log() - mass.clamp(min=max(low, 1e-3), max=high).log())
        prices += torch.where(listed, step, 0.0)
    return labels, position, prices


def _gather_rows(points, rows, chunk_size, device, normalize):
    """`points[rows]` as fp32 on device, a chunk of rows at a time (points may be a host-side half matrix)."""
    for start in range(0, len(rows), chunk_size):
        chunk = points[rows[start : start + chunk_size].to(points.device)].to(device=device, dtype=torch.float32)
        yield start, (F.normalize(chunk, dim=-1) if normalize else chunk)


def _nearest_with_room(points, norms, rows, index, distance, centers, room, chunk_size, device, normalize):
    """For each of `rows`: the nearest center with room and the squared distance to it less `||x||^2`.

    A point's candidates are its nearest centers, so when one of them has room the nearest one of those is the
    nearest with room overall: only the points all of whose candidates are full need a distance pass."""
    partial = (distance[rows] - norms[rows, None]).masked_fill_(room[index[rows]] <= 0, float("inf"))
    best = partial.min(dim=1)
    target = index[rows].gather(1, best.indices[:, None]).squeeze(1)
    target_distance = best.values
    missing = torch.isinf(target_distance).nonzero().squeeze(1)
    if len(missing):
        center_norms = centers.square().sum(-1)
        for start, chunk in _gather_rows(points, rows[missing], chunk_size, device, normalize):
            partial = _partial_distances(chunk, centers, center_norms).masked_fill_(room <= 0, float("inf"))
            best = partial.min(dim=1)
            target[missing[start : start + len(chunk)]] = best.indices
            target_distance[missing[start : start + len(chunk)]] = best.values
    return target, target_distance


def _fill(pair_cluster, pair_row, pair_value, labels, counts, surplus, need_left, own):
    """Greedy moves of points (`pair_row`) into under-full clusters (`pair_cluster`) in order of the increase of
    their squared distance (`pair_value`), vectorised in rounds: each point's cheapest move, each cluster up to its
    need, each donor down to its surplus. The globally cheapest valid move always passes, so every round moves.
    Updates `labels`, `counts`, `surplus`, `need_left` and `own` in place."""
    num_clusters, device = len(counts), labels.device
    valid = torch.isfinite(pair_value) & (need_left[pair_cluster] > 0) & (surplus[labels[pair_row]] > 0)
    while valid.any():
        pair_cluster, pair_row, pair_value = pair_cluster[valid], pair_row[valid], pair_value[valid]
        _, point_rank, _, _ = _group_order(pair_value, pair_row, len(labels))
        ok = point_rank == 0
        _, cluster_rank, _, _ = _group_order(pair_value[ok], pair_cluster[ok], num_clusters)
        ok[ok.clone()] = cluster_rank < need_left[pair_cluster[ok]]
        donors = labels[pair_row[ok]]
        _, donor_rank, _, _ = _group_order(pair_value[ok], donors, num_clusters)
        ok[ok.clone()] = donor_rank < surplus[donors]
        rows, clusters = pair_row[ok], pair_cluster[ok]
        moved_from = torch.bincount(labels[rows], minlength=num_clusters)
        moved_to = torch.bincount(clusters, minlength=num_clusters)
        surplus += moved_to - moved_from
        counts += moved_to - moved_from
        need_left -= moved_to
        labels[rows] = clusters
        own[rows] += pair_value[ok]
        moved = torch.zeros(len(labels), dtype=torch.bool, device=device)
        moved[rows] = True
        valid = ~moved[pair_row] & (need_left[pair_cluster] > 0) & (surplus[labels[pair_row]] > 0)


def _repair(
    points, norms, labels, position, index, distance, centers, low, high, chunk_size, device, normalize, exact=True
):
    """Exact step that brings every cluster size into [low, high], moving as little cost as it can greedily.

    1. The points left unassigned (label -1), and the members of over-full clusters that are cheapest
       to move (smallest gap to a candidate cluster with room), go to their nearest cluster with room; clusters
       over-subscribed in a round keep their nearest proposers. Each round fills a cluster or places every point,
       so at most K rounds. The nearest cluster with room is looked up in the candidate lists first.
    2. Each under-full cluster takes the points of clusters with a surplus (size > low) whose distance increases
       least: first among the points that list it as a candidate (no distance pass), then, for the clusters still
       under-full (e.g. centers drawn in sparse regions, which few points list), one pass over the data per round
       against those clusters only; each such round fills at least one point of the first cluster.
    Both steps only move points into clusters below the bound they fix, so the first step's result holds.
    With `exact=False` step 2 stops after the candidate lists (no pass over the data): clusters may stay below `low`.
    """
    num_clusters = len(centers)
    unassigned = labels < 0
    counts = torch.bincount(labels[~unassigned], minlength=num_clusters)
    excess = (counts - high).clamp(min=0)
    own = distance.gather(1, position[:, None]).squeeze(1)  # squared distance to the own center, kept up to date
    if excess.any() or unassigned.any():
        members = (excess[labels] > 0).logical_and_(~unassigned).nonzero().squeeze(1)
        has_room = counts < high
        alternative = torch.where(has_room[index[members]], distance[members], float("inf")).min(dim=1).values
        _, rank, _, _ = _group_order(alternative - own[members], labels[members], num_clusters)
        evicted = members[rank < excess[labels[members]]]
        counts -= torch.bincount(labels[evicted], minlength=num_clusters)
        evicted = torch.cat([evicted, unassigned.nonzero().squeeze(1)])
        while len(evicted):
            room = high - counts
            target, target_distance = _nearest_with_room(
                points, norms, evicted, index, distance, centers, room, chunk_size, device, normalize
            )
            # Ranked by the distance less ||x||^2 (what the matmul gives): on the exact-optimum tests this beat the
            # full distance (1.05 vs 1.16 x the optimum), as it favours the points whose norm puts them far out.
            _, rank, _, _ = _group_order(target_distance, target, num_clusters)
            accepted = rank < room[target]
            labels[evicted[accepted]] = target[accepted]
            own[evicted[accepted]] = target_distance[accepted] + norms[evicted[accepted]]
            counts += torch.bincount(target[accepted], minlength=num_clusters)
            evicted = evicted[~accepted]

    surplus = counts - low
    from_candidates = True
    while (counts < low).any():
        needy = (counts < low).nonzero().squeeze(1)
        need_left = (low - counts).clamp(min=0)
        if from_candidates:
            # The pairs (point, under-full cluster) already in the candidate lists, with their distance increase.
            # Flat indices, so that no (pairs, 2) block can outgrow the N x candidates lists.
            pair = ((need_left[index] > 0) & (surplus[labels] > 0)[:, None]).flatten().nonzero().squeeze(1)
            pair_row = pair // index.shape[1]
            pair_cluster, pair_value = index.flatten()[pair], distance.flatten()[pair] - own[pair_row]
            _fill(pair_cluster, pair_row, pair_value, labels, counts, surplus, need_left, own)
            from_candidates = False
            continue
        if not exact:
            break
        keep = int(min(2 * need_left.max().item() + 8, len(labels)))
        best_value = torch.full((len(needy), keep), float("inf"), device=device)
        best_index = torch.zeros((len(needy), keep), dtype=torch.long, device=device)
        needy_centers = centers[needy]
        needy_norms = needy_centers.square().sum(-1)
        for start, chunk in _iter_chunks(points, chunk_size, device, normalize):
            chunk_labels = labels[start : start + len(chunk)]
            partial = _partial_distances(chunk, needy_centers, needy_norms)  # (chunk, needy)
            increase = partial + (norms[start : start + len(chunk)] - own[start : start + len(chunk)])[:, None]
            increase.masked_fill_((surplus[chunk_labels] <= 0)[:, None], float("inf"))
            rows = torch.arange(start, start + len(chunk), device=device).expand(len(needy), -1)
            values = torch.cat([best_value, increase.T], dim=1)
            best_value, where = values.topk(min(keep, values.shape[1]), dim=1, largest=False)
            best_index = torch.cat([best_index, rows], dim=1).gather(1, where)
        pair_cluster = needy.repeat_interleave(best_value.shape[1])
        _fill(pair_cluster, best_index.flatten(), best_value.flatten(), labels, counts, surplus, need_left, own)
    return labels


def _means(points, norms, labels, centers, chunk_size, device, normalize):
    """Cluster means (an empty cluster keeps its center) and the mean squared distance of the points to them."""
    sums = torch.zeros_like(centers)
    square_norms = torch.zeros(len(centers), dtype=torch.float64, device=device)
    for start, chunk in _iter_chunks(points, chunk_size, device, normalize):
        chunk_labels = labels[start : start + len(chunk)]
        sums.index_add_(0, chunk_labels, chunk)
        square_norms.index_add_(0, chunk_labels, norms[start : start + len(chunk)].double())
    counts = torch.bincount(labels, minlength=len(centers))
    means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
    # sum ||x - mean||^2 = sum ||x||^2 - ||sum x||^2 / n, per cluster.
    inertia = (square_norms - sums.double().square().sum(-1) / counts.clamp(min=1)).sum().item()
    return means, max(inertia, 0.0) / len(labels)


def balanced_kmeans(
    points,
    num_clusters: int,
    *,
    tolerance: float = 0.1,
    num_iters: int = 25,
    seed: int = 0,
    chunk_size: int = 8192,
    device=None,
    normalize: bool = False,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means (euclidean): every cluster's size within `balanced_size_bounds(N, K, tolerance)`, i.e.
    `[floor((1 - tolerance) N / K), max(ceil(N / K), floor((1 + tolerance) N / K))]`: no cluster above
    `(1 + tolerance) N / K` wherever that is feasible; tolerance=0 means sizes differing by at most 1.

    Algorithm (chosen for speed at MoDE's sizes, 1M x 768 -> 1024):
    - init: `num_clusters` distinct points drawn uniformly (`torch.randperm(N, generator=seed)[:K]`), as faiss does;
      k-means++ would cost K sequential passes over the data.
    - each Lloyd iteration: one pass computing chunk x K distance blocks, keeping each point's `NUM_CANDIDATES`
      nearest centers; a size-constrained assignment by per-cluster prices (`_balanced_assignment`: Sinkhorn
      rounds on the candidate lists only, prices carried over between iterations); an exact greedy repair
      (`_repair`) that guarantees the size bounds, working on the candidate lists first and passing over the data
      only against the clusters they cannot fill (e.g. centers drawn in sparse regions, which few points list);
      then a pass accumulating the new means. Early stop when fewer
      than `CONVERGED_FRACTION` of the points change cluster. Every iteration's partition meets the bounds.
    Memory: the candidate lists (N x 16) and chunk x K blocks; never N x K, never N x K x D. The points may stay on
    the host (torch tensor or numpy array, any float dtype) while the work runs on `device`: one chunk is moved
    and converted to fp32 at a time. Deterministic for a seed on a given device and thread count.

    Args:
        points: `(N, dim)` matrix.
        num_clusters: K, between 1 and N.
        tolerance: allowed relative deviation of a cluster size from N / K (>= 0).
        num_iters: at most this many Lloyd iterations.
        seed: seed of the initial centers.
        chunk_size: points per distance block (memory chunk_size x K fp32).
        device: where to compute (default: the points' device).
        normalize: L2-normalise each point first (clustering on the unit sphere, as MoDE does).
        progress: show a tqdm bar over the iterations.
    Returns:
        `(labels, centers)`: `(N,)` long cluster ids and `(K, dim)` fp32 centers (the means of the returned
        clusters), on `device`.
    """
    points = _as_tensor(points)
    num_points = points.shape[0]
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of points ({num_points}).")
    if not tolerance >= 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance={tolerance} must be a finite number >= 0.")
    if num_iters < 1 or chunk_size < 1:
        raise ValueError(f"num_iters={num_iters} and chunk_size={chunk_size} must be >= 1.")
    if not points.is_floating_point():
        raise ValueError(f"points must be floating point, got {points.dtype}.")
    device = torch.device(device) if device is not None else points.device
    # One pass checks the points and keeps their squared norms, which every later pass needs.
    norms = torch.empty(num_points, device=device)
    for start, chunk in _iter_chunks(points, chunk_size, device):
        bad = (~torch.isfinite(chunk)).any(dim=1).nonzero()
        if len(bad):
            raise ValueError(f"points contain NaN or infinite values (first at row {start + bad[0].item()}).")
        norms[start : start + len(chunk)] = (F.normalize(chunk, dim=-1) if normalize else chunk).square().sum(-1)
    low, high = balanced_size_bounds(num_points, num_clusters, tolerance)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    initial = torch.randperm(num_points, generator=generator)[:num_clusters].sort().values
    centers = torch.cat([chunk for _, chunk in _gather_rows(points, initial, chunk_size, device, normalize)])

    num_candidates = min(NUM_CANDIDATES, num_clusters)
    labels, prices = None, torch.zeros(num_clusters, device=device)
    bar = tqdm(range(num_iters), desc="balanced k-means", unit="iter", disable=not progress)
    for iteration in bar:
        index, distance = _candidates(points, norms, centers, num_candidates, chunk_size, device, normalize)
        previous = labels
        labels, position, prices = _balanced_assignment(index, distance, prices, low, high, SINKHORN_ROUNDS)
        changed = num_points if previous is None else (labels != previous).sum().item()
        last = iteration == num_iters - 1 or changed < CONVERGED_FRACTION * num_points
        # Filling the last under-full clusters exactly costs passes over the data (half the time of an iteration):
        # the centers of the iterations before the last do without, from the candidate lists only.
        labels = _repair(
            points, norms, labels, position, index, distance, centers, low, high, chunk_size, device, normalize, last
        )
        centers, inertia = _means(points, norms, labels, centers, chunk_size, device, normalize)
        bar.set_postfix(inertia=f"{inertia:.4f}", changed=changed)
        if last:
            break
    bar.close()
    sizes = torch.bincount(labels, minlength=num_clusters)
    logger.info(
        f"Balanced k-means of {num_points} points into {num_clusters} clusters: {iteration + 1} iterations, "
        f"inertia (mean squared distance) {inertia:.5f}, sizes {sizes.min().item()}-{sizes.max().item()} "
        f"(bounds {low}-{high})."
    )
    return labels, centers


# ----------------------------------------------------------------------------------------------------------
# One interface: the back-ends by name
# ----------------------------------------------------------------------------------------------------------


def faiss_nearest_centers(
    points, centers: torch.Tensor, chunk_size: int = 65536, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`nearest_centers`] by faiss: an exact `IndexFlatL2` search (faiss-cpu, optional), a chunk of points at a
    time. Same arguments and results: `(labels, squared_distances)`, `(num_points,)` long and fp32 tensors on the
    centers' device (the search itself runs on the CPU). Equal labels except where two centers are at the same
    distance to float rounding."""
    import faiss

    points = _as_tensor(points)
    centers = centers.float()
    index = faiss.IndexFlatL2(centers.shape[1])
    index.add(centers.detach().cpu().contiguous().numpy())
    labels = torch.empty(points.shape[0], dtype=torch.long)
    distances = torch.empty(points.shape[0], dtype=torch.float32)
    for start, chunk in _iter_chunks(points, chunk_size, torch.device("cpu"), normalize):
        found_distances, found = index.search(chunk.contiguous().numpy(), 1)
        labels[start : start + len(chunk)] = torch.from_numpy(found[:, 0])
        distances[start : start + len(chunk)] = torch.from_numpy(found_distances[:, 0]).clamp(min=0)
    return labels.to(centers.device), distances.to(centers.device)


def faiss_available() -> bool:
    """Whether faiss can be imported (`pip install faiss-cpu`, or hf-moe's `bench` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


CLUSTERING_METHODS = {"kmeans": kmeans, "balanced_kmeans": balanced_kmeans}
ASSIGNMENT_BACKENDS = {"torch": nearest_centers, "faiss": faiss_nearest_centers}


def cluster(
    points,
    num_clusters: int,
    method: str = "kmeans",
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster `points` into `num_clusters` with the back-end `method` of `CLUSTERING_METHODS`: `(labels,
    centers)`. `options`: the back-end's keyword arguments, common (`num_iters`, `seed`, `chunk_size`, `device`,
    `normalize`, `progress`) or its own (`tol` of `kmeans`, `tolerance` of `balanced_kmeans`)."""
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"Unknown clustering method {method!r}; one of: {', '.join(CLUSTERING_METHODS)}.")
    return CLUSTERING_METHODS[method](points, num_clusters, **options)


def assignment_backend(backend: str, centers: torch.Tensor) -> str:
    """The back-end `assign` runs: `backend`, or for `auto` faiss where it is installed and `centers` are on the CPU
    (faiss-cpu's exact search is faster there), torch otherwise."""
    if backend == "auto":
        return "faiss" if centers.device.type == "cpu" and faiss_available() else "torch"
    if backend not in ASSIGNMENT_BACKENDS:
        raise ValueError(f"Unknown assignment backend {backend!r}; one of: auto, {', '.join(ASSIGNMENT_BACKENDS)}.")
    if backend == "faiss" and not faiss_available():
        raise ImportError("The faiss assignment backend needs faiss: pip install faiss-cpu (or hf-moe[bench]).")
    return backend


def assign(
    points, centers: torch.Tensor, backend: str = "auto", chunk_size: int = 65536, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest of `centers` for every point, `(labels, squared_distances)` on the centers' device, by
    `backend` (`assignment_backend`: `auto`, `torch` or `faiss`)."""
    run = ASSIGNMENT_BACKENDS[assignment_backend(backend, centers)]
    return run(points, centers, chunk_size=chunk_size, normalize=normalize)

"""k-means on feature matrices, in torch so it runs on the GPU that extracted the features.

Written by hand because scikit-learn's KMeans is CPU-only and not a core dependency; distances are
computed in chunks so memory stays O(chunk x k) whatever the number of points.
"""

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def _nearest(points: torch.Tensor, centers: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest center and the squared distance to it, for every point."""
    labels, distances = [], []
    center_norms = centers.square().sum(-1)
    for chunk in points.split(chunk_size):
        d = chunk.square().sum(-1, keepdim=True) - 2 * chunk @ centers.T + center_norms  # (chunk, k)
        best = d.min(dim=-1)
        labels.append(best.indices)
        distances.append(best.values.clamp(min=0))
    return torch.cat(labels), torch.cat(distances)


def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    num_iters: int = 100,
    seed: int = 0,
    tol: float = 1e-6,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ initialisation.

    Args:
        points: `(num_points, dim)` features (any device; computed in fp32).
        num_clusters: k.
    Returns:
        `(labels, centers)`: `(num_points,)` long cluster ids and `(k, dim)` fp32 centers.
    """
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of points ({points.shape[0]}).")
    points = points.float()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randint(points.shape[0], (1,), generator=generator).item()
    centers = points[first : first + 1]
    for _ in range(1, num_clusters):
        _, distances = _nearest(points, centers, chunk_size)
        probs = (distances / distances.sum()) if distances.sum() > 0 else torch.ones_like(distances)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).item()
        centers = torch.cat([centers, points[nxt : nxt + 1]])

    previous_inertia = float("inf")
    for _ in range(num_iters):
        labels, distances = _nearest(points, centers, chunk_size)
        counts = torch.bincount(labels, minlength=num_clusters).float()
        sums = torch.zeros_like(centers).index_add_(0, labels, points)
        # An empty cluster keeps its old center rather than collapsing to the origin.
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        inertia = distances.sum().item()
        if previous_inertia - inertia <= tol * max(previous_inertia, 1e-12):
            break
        previous_inertia = inertia
    labels, _ = _nearest(points, centers, chunk_size)
    return labels, centers

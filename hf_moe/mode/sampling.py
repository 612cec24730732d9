"""Which pairs a MoDE data expert trains on: the pairs of its fine clusters plus a random share of the others.

The paper's data expert K keeps every pair whose fine cluster maps to coarse cluster K, plus a random 2% of the
other pairs (METHODS.md section 2). Here that share is drawn ONCE, under the seed: exactly
`round(other_share * number of other pairs)` of them (Python's `round`, half to even), uniformly without
replacement. The expert's training set is then a fixed `datasets.Dataset.select` of the data, and the Trainer's
own sampler reshuffles it every epoch, shards it over processes and skips the consumed batches on resume.

Why a fixed subset rather than a custom sampler that redraws the others each epoch: the Trainer's sampler is
already deterministic per (seed, epoch) and distributed-aware, its epoch length (hence `max_steps`, the schedule
and resumption) stays fixed, and the subset is reproducible from the seed alone, so a resumed run sees the same
rows. An exact count (rather than keeping each other pair with probability `other_share`) makes the expert's
data size a known function of the clusters, and shares 0 and 1 exact.
"""

from typing import NamedTuple

import torch
from datasets import Dataset
from transformers.utils import logging


logger = logging.get_logger(__name__)


class ExpertRows(NamedTuple):
    """Row indices of a data expert's training set: `own` (its fine clusters' rows) and `other` (the random share
    of the remaining rows), each sorted."""

    own: torch.Tensor
    other: torch.Tensor

    @property
    def indices(self) -> torch.Tensor:
        """All of them, sorted."""
        return torch.cat([self.own, self.other]).sort().values


def expert_rows(
    fine_labels: torch.Tensor, fine_to_coarse: torch.Tensor, expert: int, other_share: float = 0.02, seed: int = 0
) -> ExpertRows:
    """The rows data expert `expert` trains on (see the module docstring).

    Args:
        fine_labels (`torch.LongTensor` of shape `(num_rows,)`): each row's fine cluster.
        fine_to_coarse (`torch.LongTensor` of shape `(num_fine_clusters,)`): each fine cluster's coarse cluster
            (= expert).
        expert (`int`): the expert K, `0 <= K < fine_to_coarse.max() + 1`.
        other_share (`float`, defaults to 0.02): the share of the other rows that is kept, in [0, 1].
        seed (`int`, defaults to 0): the draw of the other rows.
    """
    fine_labels, fine_to_coarse = torch.as_tensor(fine_labels), torch.as_tensor(fine_to_coarse)
    if fine_labels.ndim != 1 or fine_to_coarse.ndim != 1:
        raise ValueError(
            f"fine_labels and fine_to_coarse must be 1-D, got shapes {tuple(fine_labels.shape)} and "
            f"{tuple(fine_to_coarse.shape)}."
        )
    if fine_labels.numel() and not 0 <= int(fine_labels.min()) <= int(fine_labels.max()) < len(fine_to_coarse):
        raise ValueError(
            f"fine_labels must lie in [0, {len(fine_to_coarse)}) (the number of fine clusters), got values in "
            f"[{int(fine_labels.min())}, {int(fine_labels.max())}]."
        )
    num_experts = int(fine_to_coarse.max()) + 1 if len(fine_to_coarse) else 0
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert must be in [0, {num_experts}) (the number of experts), got {expert}.")
    if not 0.0 <= other_share <= 1.0:
        raise ValueError(f"other_share must be in [0, 1], got {other_share}.")
    is_own = fine_to_coarse[fine_labels] == expert
    own, others = is_own.nonzero().flatten(), (~is_own).nonzero().flatten()
    count = round(other_share * len(others))
    generator = torch.Generator().manual_seed(seed)
    picked = others[torch.randperm(len(others), generator=generator)[:count]].sort().values
    return ExpertRows(own, picked)


def expert_subset(
    dataset: Dataset,
    fine_labels: torch.Tensor,
    fine_to_coarse: torch.Tensor,
    expert: int,
    other_share: float = 0.02,
    seed: int = 0,
) -> tuple[Dataset, ExpertRows]:
    """`dataset` restricted to the rows of `expert_rows` (in row order), and those rows.

    `fine_labels` must hold one label per row of `dataset` (map-style: load the data with `streaming=False`).
    """
    if len(fine_labels) != len(dataset):
        raise ValueError(
            f"Got {len(fine_labels)} fine-cluster labels for a dataset of {len(dataset)} rows; the cluster "
            "assignment must cover exactly the rows of the data."
        )
    rows = expert_rows(fine_labels, fine_to_coarse, expert, other_share, seed)
    if not len(rows.own):
        raise ValueError(f"Expert {expert} has no row of its own in this data: no fine cluster of it is assigned.")
    logger.info(
        f"Data expert {expert}: {len(rows.own)} rows of its clusters + {len(rows.other)} other rows "
        f"({other_share:g} of {len(dataset) - len(rows.own)}) of {len(dataset)}"
    )
    return dataset.select(rows.indices.tolist()), rows


__all__ = ["ExpertRows", "expert_rows", "expert_subset"]

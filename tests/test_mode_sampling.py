"""A MoDE data expert's rows: its fine clusters' rows plus an exact, seeded share of the others; reshuffled per epoch
by the Trainer's own sampler."""

import pytest
import torch
from datasets import Dataset

from hf_moe.mode.sampling import expert_rows, expert_subset


# 12 fine clusters -> 3 experts; 600 rows with uneven cluster sizes.
FINE_TO_COARSE = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 1, 0, 0, 1])


def fine_labels(num_rows=600, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(FINE_TO_COARSE), (num_rows,), generator=generator) ** 2 // len(FINE_TO_COARSE)


@pytest.mark.parametrize("expert", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("share", [0.0, 0.02, 0.3, 1.0])
def test_expert_rows_are_its_clusters_plus_the_share_of_others(expert, seed, share):
    labels = fine_labels()
    rows = expert_rows(labels, FINE_TO_COARSE, expert, other_share=share, seed=seed)
    # Reference: membership by looping over rows and clusters.
    own = [i for i, label in enumerate(labels.tolist()) if FINE_TO_COARSE[label] == expert]
    others = sorted(set(range(len(labels))) - set(own))
    assert rows.own.tolist() == own
    assert len(rows.other) == round(share * len(others))
    assert set(rows.other.tolist()) <= set(others)
    assert len(set(rows.other.tolist())) == len(rows.other)  # without replacement
    assert rows.indices.tolist() == sorted(own + rows.other.tolist())
    if share == 1.0:
        assert rows.other.tolist() == others
    # Deterministic under the seed.
    again = expert_rows(labels, FINE_TO_COARSE, expert, other_share=share, seed=seed)
    assert torch.equal(again.other, rows.other)


def test_other_rows_depend_on_the_seed():
    labels = fine_labels()
    draws = {tuple(expert_rows(labels, FINE_TO_COARSE, 0, 0.1, seed=seed).other.tolist()) for seed in range(4)}
    assert len(draws) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expert=3), r"expert must be in \[0, 3\).*got 3"),
        (dict(expert=-1), r"expert must be in \[0, 3\).*got -1"),
        (dict(other_share=1.5), r"other_share must be in \[0, 1\], got 1.5"),
        (dict(fine_labels=torch.tensor([0, 12])), r"fine_labels must lie in \[0, 12\).*\[0, 12\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    arguments = dict(fine_labels=fine_labels(), fine_to_coarse=FINE_TO_COARSE, expert=0, other_share=0.02)
    with pytest.raises(ValueError, match=message):
        expert_rows(**{**arguments, **kwargs})


def test_expert_subset_selects_the_rows_and_checks_the_label_count():
    labels = fine_labels(60)
    dataset = Dataset.from_dict({"index": list(range(60)), "fine": labels.tolist()})
    subset, rows = expert_subset(dataset, labels, FINE_TO_COARSE, 1, other_share=0.25, seed=3)
    assert subset["index"] == rows.indices.tolist()
    own = [i for i in subset["index"] if FINE_TO_COARSE[labels[i]] == 1]
    assert own == rows.own.tolist()
    with pytest.raises(ValueError, match="Got 59 fine-cluster labels for a dataset of 60 rows"):
        expert_subset(dataset, labels[:59], FINE_TO_COARSE, 1)


def test_the_trainers_sampler_reshuffles_the_subset_every_epoch_deterministically(toy_clip_dir, tmp_path):
    from transformers import CLIPModel

    from hf_moe.clip_training import CLIPTrainer, CLIPTrainingArguments

    labels = fine_labels(120)
    dataset = Dataset.from_dict({"index": list(range(120))})
    subset, rows = expert_subset(dataset, labels, FINE_TO_COARSE, 2, other_share=0.1, seed=0)

    def epoch_orders(seed):
        args = CLIPTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True, seed=seed
        )
        trainer = CLIPTrainer(
            model=CLIPModel.from_pretrained(toy_clip_dir),
            args=args,
            train_dataset=subset,
            data_collator=lambda batch: {"index": torch.tensor([row["index"] for row in batch])},
        )
        loader = trainer.get_train_dataloader()
        orders = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            orders.append(torch.cat([batch["index"] for batch in loader]).tolist())
        return orders

    first, second = epoch_orders(seed=0)
    assert sorted(first) == sorted(second) == rows.indices.tolist()  # each epoch: every subset row once
    assert first != second
    assert epoch_orders(seed=0) == [first, second]
    assert epoch_orders(seed=1)[0] != first


def test_an_expert_without_rows_of_its_own_is_refused():
    labels = torch.tensor([0, 1, 3, 4])  # fine clusters of experts 0 and 1 only
    dataset = Dataset.from_dict({"index": list(range(4))})
    with pytest.raises(ValueError, match="Expert 2 has no row of its own"):
        expert_subset(dataset, labels, FINE_TO_COARSE, 2, other_share=1.0)

"""Multistage Contrastive Learning (MCL): N diverse CLIP experts from one dense CLIP, then the CLIP-MoE.

Stage 0 is the base model itself (positions stretched for Long-CLIP). Stage s (1 <= s < N):
1. extract L2-normalised image and text features of the whole training set with the stage s-1 model;
2. k-means on image features (k=3) and on text features (k=3) separately -> joint label 3 * text + image,
   accumulated across stages: label = previous_label * 9 + stage_label;
3. train a fresh copy of the BASE model, MLP parameters only, on batches that each come from one accumulated
   cluster (the InfoNCE denominator then only holds samples of that cluster).
The N stage checkpoints share every non-MLP weight, and `upcycle_clip` turns them into `DIR/moe`.

Loss of a stage: the CLIP contrastive loss only (a dense CLIP: no router terms), averaged per micro-batch over the
batch gathered from all processes (`hf_moe.clip_training`), so its weight is 1 at any `gradient_accumulation_steps`
and number of processes. `ClusterBatchSampler` draws each GLOBAL micro-batch (all processes together) from one
cluster, so the negatives of every contrastive loss are samples of that cluster, as in the official MCL; accumulated
micro-batches may come from different clusters (each is its own contrastive loss, and the k are averaged).

Every step is resumable: finished stages, labels and feature shards are kept, and a stage's training resumes
from its last complete Trainer checkpoint. The job's options and a fingerprint of the base and the data are
recorded in `DIR/hf_moe_job.json`: a re-run with other options or changed data is refused, not mixed in.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import AutoProcessor, CLIPConfig, CLIPModel
from transformers.utils import logging

from ..arguments import parse_command_line
from ..cards import CardSpec, options_table, write_training_card
from ..clustering import cluster
from ..conversion.upcycle_clip import upcycle_clip
from ..data import ImageTextCollator, add_index_column, load_image_text_dataset
from ..evaluation import projected_embeddings
from ..fileio import atomic_output_dir, atomic_output_file
from ..loading import load_clip_processor, load_config, load_pretrained
from ..modeling import stretch_text_positions
from ..modeling.configuration_clip_moe import CLIP_TEXT_LENGTH, LONG_CLIP_TEXT_LENGTH
from ..publish import write_model
from ..training import (
    TrainingJob,
    input_fingerprint,
    local_path,
    model_fingerprint,
    push_training_output,
    result_options,
    train_from_last_checkpoint,
)
from .trainer import CLIPMoETrainer, CLIPMoETrainingArguments, MCLTrainingArguments


logger = logging.get_logger(__name__)


@dataclass
class MCLArguments:
    base: str = field(metadata={"help": "Dense CLIP to diversify (Hub id or folder)."})
    data: str = field(metadata={"help": "Image-caption data (image folder with metadata.jsonl, img2dataset, shards)."})
    num_experts: int = field(default=4, metadata={"help": "Experts N: N - 1 MCL stages after the base."})
    top_k: int = field(default=2, metadata={"help": "Experts per token of the final CLIP-MoE."})
    image_clusters: int = field(default=3, metadata={"help": "k of the image-feature k-means per stage."})
    text_clusters: int = field(default=3, metadata={"help": "k of the text-feature k-means per stage."})
    long_text: bool = field(
        default=True,
        metadata={
            "help": "Long-CLIP text: stretch positions 77 -> 248, as the CLIP-MoE recipe does (--no_long_text: off)."
        },
    )
    feature_batch_size: int = field(default=256, metadata={"help": "Per-device batch size of feature extraction."})
    feature_shard_size: int = field(default=8192, metadata={"help": "Samples per feature shard file."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the base to run model code from its folder or Hub repo."}
    )


# Settings that change neither the stages nor the MoE (feature shards are named by their size, so a changed
# size recomputes them); `data` is compared by its fingerprint, not by how its path is spelled.
MCL_NOT_RESULT_OPTIONS = {"data", "feature_batch_size", "feature_shard_size", "trust_remote_code"}


@torch.inference_mode()
def extract_features(
    model: CLIPModel,
    dataset,
    collator,
    output_dir: Path,
    batch_size: int = MCLArguments.feature_batch_size,
    shard_size: int = MCLArguments.feature_shard_size,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features of every row of `dataset`, in row order.

    Shards of `shard_size` rows are spread over the processes and written to `output_dir` as safetensors;
    shards already there are reused, so an interrupted extraction resumes where it stopped.
    """
    state = PartialState()
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(state.device).eval()
    num_shards = math.ceil(len(dataset) / shard_size)
    shard_path = lambda shard: output_dir / f"shard-{shard:06d}-of-{num_shards:06d}.safetensors"  # noqa: E731
    todo = [s for s in range(state.process_index, num_shards, state.num_processes) if not shard_path(s).exists()]
    for shard in tqdm(todo, desc="feature shards", disable=not state.is_local_main_process):
        rows = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
        images, texts = [], []
        for start in range(rows.start, rows.stop, batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, rows.stop))])
            pixel_values = batch["pixel_values"].to(state.device, model.dtype)
            images.append(projected_embeddings(model.get_image_features(pixel_values=pixel_values)).float().cpu())
            texts.append(
                projected_embeddings(
                    model.get_text_features(
                        input_ids=batch["input_ids"].to(state.device),
                        attention_mask=batch["attention_mask"].to(state.device),
                    )
                )
                .float()
                .cpu()
            )
        with atomic_output_file(shard_path(shard)) as tmp:
            save_file({"image": torch.cat(images), "text": torch.cat(texts)}, tmp)
    state.wait_for_everyone()
    shards = [load_file(shard_path(s)) for s in range(num_shards)]
    image = torch.nn.functional.normalize(torch.cat([s["image"] for s in shards]), dim=-1)
    text = torch.nn.functional.normalize(torch.cat([s["text"] for s in shards]), dim=-1)
    return image, text


def joint_cluster_labels(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_clusters: int = MCLArguments.image_clusters,
    text_clusters: int = MCLArguments.text_clusters,
    seed=0,
    method: str = "kmeans",
) -> torch.Tensor:
    """MCL's stage label: clusters of the image and of the text features separately (`method`, a back-end of
    `hf_moe.clustering.cluster`: k-means, as the MCL paper), joined as `k_i * text + image`."""
    image_labels, _ = cluster(image_features, image_clusters, method=method, seed=seed)
    text_labels, _ = cluster(text_features, text_clusters, method=method, seed=seed)
    return image_clusters * text_labels + image_labels


class ClusterBatchSampler(Sampler[list[int]]):
    """Batches in which every GLOBAL batch (all processes together) comes from a single cluster.

    Each cluster is shuffled and cut into global batches of `batch_size * num_replicas` (remainders dropped);
    the global batches of all clusters are shuffled together, and process `rank` yields its slice of each.
    Clusters smaller than a global batch cannot form one and are skipped (and logged).
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.global_batch_size = batch_size * num_replicas
        self.epoch = 0
        labels = torch.as_tensor(labels)
        self.clusters, skipped = [], {}
        for label in labels.unique().tolist():
            members = (labels == label).nonzero().flatten()
            if len(members) >= self.global_batch_size:
                self.clusters.append(members)
            else:
                skipped[label] = len(members)
        if skipped:
            logger.warning(
                f"Skipping {len(skipped)} clusters smaller than a global batch of {self.global_batch_size} "
                f"({sum(skipped.values())} samples): {dict(sorted(skipped.items()))}"
            )
        if not self.clusters:
            raise ValueError(
                f"No cluster holds a global batch of {self.global_batch_size} samples; lower the batch size."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(members) // self.global_batch_size for members in self.clusters)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        global_batches = []
        for members in self.clusters:
            shuffled = members[torch.randperm(len(members), generator=generator)]
            usable = len(members) // self.global_batch_size * self.global_batch_size
            global_batches.extend(shuffled[:usable].split(self.global_batch_size))
        start = self.rank * self.batch_size
        for order in torch.randperm(len(global_batches), generator=generator).tolist():
            yield global_batches[order][start : start + self.batch_size].tolist()


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches its batch sampler.

    transformers' Trainer calls `set_epoch` on the DataLoader itself or on `dataloader.batch_sampler.batch_sampler`
    (accelerate's wrappers), never on a plain DataLoader's own batch sampler: without this, every epoch would
    repeat the first epoch's batches.
    """

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class MCLStageTrainer(CLIPMoETrainer):
    """Trains one MCL stage: batches from `ClusterBatchSampler` over the accumulated cluster labels."""

    def __init__(self, *args, cluster_labels: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.cluster_labels = cluster_labels

    def get_train_dataloader(self) -> DataLoader:
        # Not passed through accelerate's sharding: the sampler already gives each process its slice of a
        # single-cluster global batch, which re-sharding would mix across clusters.
        sampler = ClusterBatchSampler(
            self.cluster_labels,
            self.args.per_device_train_batch_size,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.seed,
        )
        return EpochDataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )


def check_mcl_arguments(mcl_args: MCLArguments) -> CLIPConfig:
    """Every check that needs no training, before anything is written; returns the base's config."""
    if mcl_args.num_experts < 2:
        raise ValueError(
            f"MCL needs num_experts >= 2 (one stage per expert after the base), got {mcl_args.num_experts}."
        )
    if not 1 <= mcl_args.top_k <= mcl_args.num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={mcl_args.num_experts}, got {mcl_args.top_k}.")
    for name in ("image_clusters", "text_clusters", "feature_batch_size", "feature_shard_size"):
        if getattr(mcl_args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(mcl_args, name)}.")
    config = load_config(mcl_args.base, trust_remote_code=mcl_args.trust_remote_code, require_moe=False)
    if not isinstance(config, CLIPConfig):
        raise ValueError(
            f"MCL needs a dense CLIP as --base (model_type 'clip'); '{mcl_args.base}' is a '{config.model_type}'."
        )
    positions = config.text_config.max_position_embeddings
    if mcl_args.long_text and positions not in (CLIP_TEXT_LENGTH, LONG_CLIP_TEXT_LENGTH):
        raise ValueError(
            f"--long_text stretches {CLIP_TEXT_LENGTH} text positions to {LONG_CLIP_TEXT_LENGTH}, but "
            f"'{mcl_args.base}' has {positions}; pass --no_long_text."
        )
    return config


def mcl_job(mcl_args: MCLArguments, training_args: CLIPMoETrainingArguments) -> TrainingJob:
    """The MCL job in `training_args.output_dir`: its options (the base by absolute path) and fingerprints of
    the base's weights and of the data."""
    options = result_options(mcl_args, training_args, exclude=MCL_NOT_RESULT_OPTIONS)
    options["base"] = local_path(mcl_args.base)
    return TrainingJob(
        training_args.output_dir,
        "mcl",
        options,
        inputs={"base": model_fingerprint(mcl_args.base), "data": input_fingerprint(mcl_args.data)},
        owned_outputs=("stage*", "labels", "features", "moe"),
    )


def save_stage0(base: str, output_dir: Path, long_text: bool, trust_remote_code: bool = False) -> None:
    """Expert 0: the base itself, with Long-CLIP's stretched text positions when asked for."""
    dense = load_pretrained(base, CLIPModel, trust_remote_code=trust_remote_code, require_moe=False)
    if long_text and dense.config.text_config.max_position_embeddings != LONG_CLIP_TEXT_LENGTH:
        config = dense.config
        config.text_config.max_position_embeddings = LONG_CLIP_TEXT_LENGTH
        state_dict = dense.state_dict()
        key = "text_model.embeddings.position_embedding.weight"
        state_dict[key] = stretch_text_positions(state_dict[key])
        dense = CLIPModel(config)
        dense.load_state_dict(state_dict)
    save_stage(dense, base, output_dir)


def save_stage(model: CLIPModel, base: str | Path, folder: Path) -> None:
    """An MCL stage folder: the dense CLIP and the processor of `base`, its tokenizer at the model's text length."""
    processor = load_clip_processor(base, model.config.text_config.max_position_embeddings)
    write_model(model, folder, processor=processor, overwrite=True, inputs=[base])


def run_mcl(mcl_args: MCLArguments, training_args: CLIPMoETrainingArguments) -> Path:
    """Run (or resume) MCL in `training_args.output_dir`: stage0..stage{N-1} and the CLIP-MoE in `moe/`.

    A finished job returns at once; a re-run with other options or changed inputs raises `JobMismatchError`.
    With `training_args.push_to_hub`, `moe/` (with its model card) is pushed to `hub_model_id`.
    """
    check_mcl_arguments(mcl_args)
    root, state = Path(training_args.output_dir), PartialState()
    moe_dir = root / "moe"
    job = mcl_job(mcl_args, training_args)
    job.check()
    if job.is_complete() and moe_dir.is_dir():
        logger.warning(f"MCL in {root} is already complete; nothing to do (the CLIP-MoE is {moe_dir}).")
        push_training_output(moe_dir, training_args)
        return moe_dir

    dataset = add_index_column(load_image_text_dataset(mcl_args.data, streaming=False))
    job.record()
    stage_dirs = [root / f"stage{s}" for s in range(mcl_args.num_experts)]
    if not stage_dirs[0].exists():
        if state.is_main_process:
            save_stage0(mcl_args.base, stage_dirs[0], mcl_args.long_text, mcl_args.trust_remote_code)
        state.wait_for_everyone()

    processor = AutoProcessor.from_pretrained(stage_dirs[0])
    collator = ImageTextCollator(processor)
    labels = torch.zeros(len(dataset), dtype=torch.long)
    clusters_per_stage = mcl_args.image_clusters * mcl_args.text_clusters
    for stage in range(1, mcl_args.num_experts):
        labels = labels * clusters_per_stage + _stage_labels(mcl_args, root, stage, dataset, collator, training_args)
        if stage_dirs[stage].exists():
            logger.info(f"MCL stage {stage} already trained in {stage_dirs[stage]}")
            continue
        _train_stage(mcl_args, training_args, stage_dirs, stage, dataset, collator, labels)

    if state.is_main_process:
        if not moe_dir.exists():
            _build_moe(mcl_args, training_args, stage_dirs, moe_dir)
        job.mark_complete()
    state.wait_for_everyone()
    push_training_output(moe_dir, training_args)
    return moe_dir


def _build_moe(mcl_args, training_args, stage_dirs: list[Path], moe_dir: Path) -> None:
    """The CLIP-MoE of the stage checkpoints, with its model card, written atomically to `moe_dir`."""
    # upcycle_clip names the folder it writes, here the temporary one: its message gives way to one naming moe_dir.
    upcycle_logger = logging.get_logger(upcycle_clip.__module__)
    level = upcycle_logger.level
    with atomic_output_dir(moe_dir) as tmp:
        upcycle_logger.setLevel(max(logging.WARNING, upcycle_logger.getEffectiveLevel()))
        try:
            upcycle_clip(stage_dirs, tmp, top_k=mcl_args.top_k, overwrite=True)
        finally:
            upcycle_logger.setLevel(level)
        card = CardSpec(
            base_model=mcl_args.base,
            how_built=_how_built(mcl_args, training_args),
            tags=("clip", "clip-moe", "mcl"),
            description=(
                "A CLIP-MoE (Diversified Multiplet Upcycling) built with hf-moe: expert i of every block is the MLP "
                f"of MCL stage i of {mcl_args.base}; the routers are untrained (train them with "
                "`hf-moe train-router`)."
            ),
        )
        write_training_card(tmp, training_args, card)
    logger.info(f"Built the {mcl_args.num_experts}-expert top-{mcl_args.top_k} CLIP-MoE of the MCL stages in {moe_dir}")


def _how_built(mcl_args, training_args) -> str:
    options = result_options(mcl_args, training_args, exclude={"trust_remote_code"})
    return (
        f"`hf-moe mcl` (Multistage Contrastive Learning): stage 0 is `{mcl_args.base}`"
        f"{' with Long-CLIP text positions (248)' if mcl_args.long_text else ''}; each of the "
        f"{mcl_args.num_experts - 1} further stages fine-tunes a fresh copy of it (MLPs only) on batches drawn "
        f"from one accumulated ({mcl_args.image_clusters} image x {mcl_args.text_clusters} text) k-means cluster; "
        f"expert i = stage i, top-{mcl_args.top_k} routing.\n\n{options_table(options)}"
    )


def _stage_labels(mcl_args, root: Path, stage: int, dataset, collator, training_args) -> torch.Tensor:
    """The clusters of the stage-1 model's features (computed once, then read back from `labels/`)."""
    path, state = root / "labels" / f"stage{stage}.safetensors", PartialState()
    if not path.exists():
        model = CLIPModel.from_pretrained(root / f"stage{stage - 1}")
        image, text = extract_features(
            model,
            dataset,
            collator,
            root / "features" / f"stage{stage - 1}",
            mcl_args.feature_batch_size,
            mcl_args.feature_shard_size,
        )
        if state.is_main_process:
            stage_labels = joint_cluster_labels(
                image.to(state.device),
                text.to(state.device),
                mcl_args.image_clusters,
                mcl_args.text_clusters,
                seed=training_args.seed + stage,
            ).cpu()
            with atomic_output_file(path) as tmp:
                save_file({"labels": stage_labels}, tmp)
        state.wait_for_everyone()
    return load_file(path)["labels"]


def _train_stage(mcl_args, training_args, stage_dirs, stage, dataset, collator, labels) -> None:
    """Train stage `stage` from the base (stage 0), MLPs only, then save it atomically."""
    run_dir = stage_dirs[stage].with_name(f"{stage_dirs[stage].name}-run")
    # MLPs only, whatever was asked: upcycling needs every other weight shared by all stages. The stage runs
    # are intermediate: only DIR/moe is pushed, by run_mcl.
    args = dataclasses.replace(
        training_args, output_dir=str(run_dir), trainable_parameters=[r"\.mlp\."], push_to_hub=False
    )
    trainer = MCLStageTrainer(
        model=CLIPModel.from_pretrained(stage_dirs[0]),
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        cluster_labels=labels,
    )
    train_from_last_checkpoint(trainer, run_dir, f"MCL stage {stage}")
    if trainer.is_world_process_zero():
        save_stage(trainer.model, stage_dirs[0], stage_dirs[stage])
    PartialState().wait_for_everyone()


def main(argv: list[str] | None = None) -> Path:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((MCLArguments, MCLTrainingArguments), prog="hf-moe mcl")
    mcl_args, training_args = parse_command_line(parser, argv)
    moe_dir = run_mcl(mcl_args, training_args)
    logger.warning(
        f"MCL finished: stage checkpoints and the CLIP-MoE are in {training_args.output_dir} (moe/: {moe_dir})"
    )
    return moe_dir

"""MoDE data-expert training: ordinary CLIP training of the WHOLE seed model, where only the sampling changes: the
pairs of expert K's fine clusters plus a random `--other_share` (0.02) of the other pairs (`hf_moe.mode.sampling`).

    hf-moe mode train-expert --seed_model seed-clip --data shards/ --clusters clusters/ --expert 0 \
        --output_dir expert-0 --bf16 --gradient_checkpointing --per_device_train_batch_size 256 --max_steps 10000
    accelerate launch examples/mode/train_mode_expert.py ... (the same options)

As in the paper, every expert starts from one seed checkpoint trained on all the data and continues with the
seed's recipe (OpenCLIP / MetaCLIP): AdamW (beta2 0.98, eps 1e-6, weight decay 0.2), cosine decay, no label
smoothing, the model's learned logit scale (capped at 100, as OpenCLIP clamps it), no gradient clipping. The
default peak learning rate, 3e-5, is where MetaCLIP B/32's cosine schedule (5e-4 over 32 epochs) stands at epoch
27, where MoDE's experts branch off; an optimizer state is not carried over from the seed.

Loss: the CLIP contrastive loss only, per micro-batch over the batch gathered from all processes (the negatives are
W x per_device_train_batch_size pairs), the k accumulated micro-batches averaged (`hf_moe.clip_training`): weight 1
at any `--gradient_accumulation_steps` and number of processes; accumulation does not enlarge the contrastive batch
(OpenCLIP's `--accum-freq` does, by caching features: use more processes or a larger per-device batch for that).

A re-run continues the same job or refuses: the options and fingerprints of the seed model, the data and the
clusters are recorded in `OUTPUT_DIR/hf_moe_job.json`; an interrupted run resumes from its last complete checkpoint;
a finished run is reported as done and left untouched.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPModel, HfArgumentParser
from transformers.utils import logging

from ..arguments import parse_command_line
from ..clip_training import CLIPTrainer, CLIPTrainingArguments
from ..data import ImageTextCollator, add_index_column, load_image_text_dataset
from ..loading import check_model_type, load_config, load_pretrained
from ..training import (
    TrainingJob,
    complete_job,
    input_fingerprint,
    job_already_done,
    local_path,
    model_fingerprint,
    result_options,
    train_from_last_checkpoint,
)
from .cluster_files import clusters_id, read_cluster_folder
from .data import fine_labels_of
from .sampling import expert_subset


logger = logging.get_logger(__name__)


@dataclass
class DataExpertArguments:
    seed_model: str = field(
        metadata={"aliases": ["--base"], "help": "Dense CLIP every expert starts from (folder or Hub id)."}
    )
    data: str = field(metadata={"help": "Image-caption data that `hf-moe mode cluster` assigned (any layout)."})
    clusters: str = field(metadata={"help": "Output folder of `hf-moe mode cluster`."})
    expert: int = field(metadata={"help": "The expert K to train: the coarse cluster K, 0 <= K < num_experts."})
    other_share: float = field(
        default=0.02,
        metadata={"help": "Share of the OTHER experts' pairs also trained on (paper: 0.02), drawn once under --seed."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow --seed_model to run model code from its folder or Hub repo."}
    )


@dataclass
class DataExpertTrainingArguments(CLIPTrainingArguments):
    """`CLIPTrainingArguments` with the seed's (OpenCLIP / MetaCLIP) recipe as defaults; see the module docstring."""

    learning_rate: float = field(
        default=3e-5, metadata={"help": "Peak learning rate (MetaCLIP B/32's cosine at epoch 27 of 32: 3e-5)."}
    )
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW weight decay (OpenCLIP / MetaCLIP: 0.2)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (OpenCLIP / MetaCLIP: 0.98)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (OpenCLIP / MetaCLIP: 1e-6)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warm-up (cosine)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none (OpenCLIP: none)."})
    max_logit_scale: float = field(
        default=100.0, metadata={"help": "Cap of the learned logit scale (OpenCLIP clamps it at 100)."}
    )


class DataExpertTrainer(CLIPTrainer):
    """`CLIPTrainer` whose learned logit scale is capped at `max_logit_scale`."""

    def _logit_scale(self, model) -> torch.Tensor | float:
        # OpenCLIP clamps the parameter in place after each step; capping the value used gives the same loss
        # without editing the weights behind the optimizer's back.
        scale = super()._logit_scale(model)
        return scale.clamp(max=self.args.max_logit_scale) if torch.is_tensor(scale) else scale


def read_fine_to_coarse(clusters_dir: str | Path) -> tuple[int, torch.Tensor]:
    """`(num_experts, fine_to_coarse)` of the output of `hf-moe mode cluster` (`read_cluster_folder`, which checks
    it as `hf-moe mode build` does)."""
    info, centers = read_cluster_folder(clusters_dir)
    return int(info["num_experts"]), centers["fine_to_coarse"].long()


def check_expert_arguments(script_args: DataExpertArguments) -> tuple[int, torch.Tensor]:
    """Every check that needs no data or training, before anything is written; returns `read_fine_to_coarse`."""
    if not 0.0 <= script_args.other_share <= 1.0:
        raise ValueError(f"--other_share must be in [0, 1], got {script_args.other_share}.")
    # require_moe=False refuses every hf-moe model (a WEMoE or MoDE would load as a plain CLIP, losing its parts).
    config = load_config(script_args.seed_model, trust_remote_code=script_args.trust_remote_code, require_moe=False)
    check_model_type(
        config, script_args.seed_model, ("clip",), "--seed_model of `hf-moe mode train-expert` (a dense CLIP)"
    )
    num_experts, fine_to_coarse = read_fine_to_coarse(script_args.clusters)
    if not 0 <= script_args.expert < num_experts:
        raise ValueError(
            f"--expert {script_args.expert} is out of range: {script_args.clusters} has {num_experts} experts "
            f"(0 to {num_experts - 1})."
        )
    return num_experts, fine_to_coarse


# Compared by their fingerprints, not by how their paths are spelled; trust_remote_code does not change the result.
NOT_RESULT_OPTIONS = {"data", "clusters", "trust_remote_code"}


def expert_job(script_args: DataExpertArguments, training_args: DataExpertTrainingArguments) -> TrainingJob:
    """The data-expert job in `training_args.output_dir`: its options (the seed by absolute path, the expert index,
    the clusters' content fingerprint `clusters_id`, which `hf-moe mode build` checks against the clusters it is
    given) and fingerprints of the seed's weights, the data and the clusters."""
    options = result_options(script_args, training_args, exclude=NOT_RESULT_OPTIONS)
    options["seed_model"] = local_path(script_args.seed_model)
    # An option, not an input: options a record lacks are not compared, so jobs recorded before it still resume.
    options["clusters_id"] = clusters_id(script_args.clusters)
    inputs = {
        "seed_model": model_fingerprint(script_args.seed_model),
        "data": input_fingerprint(script_args.data),
        "clusters": input_fingerprint(script_args.clusters),
    }
    return TrainingJob(
        training_args.output_dir,
        "mode train-expert",
        options,
        inputs=inputs,
        owned_outputs=("checkpoint-*", "model*.safetensors"),
    )


def train_expert(script_args: DataExpertArguments, training_args: DataExpertTrainingArguments) -> Path:
    """Train data expert `script_args.expert` from the seed model; save the model, its processor and a model card
    in `training_args.output_dir`.

    Re-running continues an interrupted job from its last complete checkpoint, returns a finished one untouched,
    and refuses (`JobMismatchError`) one whose options, seed model, data or clusters differ.
    """
    output_dir = Path(training_args.output_dir)
    num_experts, fine_to_coarse = check_expert_arguments(script_args)
    job = expert_job(script_args, training_args)
    if job_already_done(
        job, training_args, f"Data expert {script_args.expert} in {output_dir} is already trained; nothing to do."
    ):
        return output_dir

    # The index column lets the collator report which rows a batch holds (the trainer drops it).
    dataset = add_index_column(load_image_text_dataset(script_args.data, streaming=False))
    fine_labels = fine_labels_of(dataset, script_args.clusters, data=script_args.data)
    subset, rows = expert_subset(
        dataset, fine_labels, fine_to_coarse, script_args.expert, script_args.other_share, training_args.seed
    )
    model = load_pretrained(
        script_args.seed_model, CLIPModel, trust_remote_code=script_args.trust_remote_code, require_moe=False
    )
    processor = AutoProcessor.from_pretrained(script_args.seed_model)
    job.record()
    # We push the final folder ourselves, with our model card; the Trainer would push every checkpoint with its own.
    trainer = DataExpertTrainer(
        model=model,
        args=replace(training_args, push_to_hub=False),
        train_dataset=subset,
        data_collator=ImageTextCollator(processor),
    )
    train_from_last_checkpoint(trainer, output_dir, f"data expert {script_args.expert}")
    trainer.save_model()

    def write_outputs():
        processor.save_pretrained(output_dir)
        _write_card(output_dir, script_args, training_args, num_experts, rows, len(dataset), trainer.state.global_step)

    return complete_job(trainer, job, training_args, write_outputs)


def _write_card(output_dir: Path, script_args, training_args, num_experts: int, rows, num_rows: int, steps: int):
    from ..cards import CardSpec, options_table, write_training_card

    options = result_options(script_args, training_args, exclude={"trust_remote_code"})
    card = CardSpec(
        base_model=script_args.seed_model,
        how_built=(
            f"`hf-moe mode train-expert`: MoDE data expert {script_args.expert} of {num_experts}, the whole CLIP "
            f"`{script_args.seed_model}` trained for {steps} steps with the CLIP contrastive loss on the "
            f"{len(rows.own)} pairs of `{script_args.data}` whose fine cluster (clusters `{script_args.clusters}`) "
            f"belongs to expert {script_args.expert}, plus {len(rows.other)} pairs of the other experts (other share "
            f"{script_args.other_share:g}), of {num_rows} pairs.\n\n{options_table(options)}"
        ),
        tags=("clip", "mode", "data-expert"),
        description=(
            f"A CLIP data expert (MoDE: CLIP Data Experts via Clustering): expert {script_args.expert} of "
            f"{num_experts}, for `hf-moe mode build` to ensemble with the others."
        ),
    )
    write_training_card(output_dir, training_args, card)


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser((DataExpertArguments, DataExpertTrainingArguments), prog="hf-moe mode train-expert")
    script_args, training_args = parse_command_line(parser, argv)
    return train_expert(script_args, training_args)

"""Router training of a CLIP-MoE (the second phase of the CLIP-MoE recipe): only the routers train, with
loss = CLIP contrastive loss + the image and text balance losses, weighted per tower.

    hf-moe train-router --model clip-moe --data captions/ --output_dir clip-moe-routed --max_steps 1000
    accelerate launch examples/clip_moe/train_clip_moe.py --model clip-moe --data shards/ --output_dir out ...

Loss averaging (`hf_moe.clip_moe.trainer`): the contrastive loss per micro-batch over the batch gathered from all
processes, the balance losses per micro-batch and per process (each process' own tokens), both averaged over the
accumulated micro-batches and the processes: weights 1 and 0.01 (paper) whatever `--gradient_accumulation_steps` and
the number of processes.

A re-run continues the same job or refuses: the options and fingerprints of the model and the data are recorded
in `OUTPUT_DIR/hf_moe_job.json`; an interrupted run resumes from its last complete checkpoint; a finished run is
reported as done and left untouched. `--push_to_hub --hub_model_id` pushes the final folder with its model card.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoModel, AutoProcessor, HfArgumentParser
from transformers.utils import logging

from ..arguments import parse_command_line
from ..data import ImageTextCollator, load_image_text_dataset
from ..loading import check_model_path, load_pretrained
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
from .trainer import CLIPMoERouterTrainingArguments, CLIPMoETrainer, CLIPMoETrainingArguments


logger = logging.get_logger(__name__)


@dataclass
class RouterTrainingArguments:
    model: str = field(metadata={"help": "CLIP-MoE folder or Hub id (e.g. the output of hf-moe mcl: DIR/moe)."})
    data: str = field(metadata={"help": "Image-caption data (image folder with metadata.jsonl, img2dataset, shards)."})
    streaming: bool | None = field(default=None, metadata={"help": "Stream the data (default: for tar shards)."})
    expert_dropout: float = field(default=0.1, metadata={"help": "Dropout inside the experts while training."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow --model to run model code from its folder or Hub repo."}
    )


# `data` is compared by its fingerprint (not by how its path is spelled); the others do not change the result.
ROUTER_NOT_RESULT_OPTIONS = {"data", "streaming", "trust_remote_code"}


def router_job(script_args: RouterTrainingArguments, training_args: CLIPMoETrainingArguments) -> TrainingJob:
    """The router-training job in `training_args.output_dir`: its options (the model by absolute path) and
    fingerprints of the model's weights and of the data."""
    options = result_options(script_args, training_args, exclude=ROUTER_NOT_RESULT_OPTIONS)
    options["model"] = local_path(script_args.model)
    return TrainingJob(
        training_args.output_dir,
        "train-router",
        options,
        inputs={"model": model_fingerprint(script_args.model), "data": input_fingerprint(script_args.data)},
        owned_outputs=("checkpoint-*", "model*.safetensors"),
    )


def train_router(script_args: RouterTrainingArguments, training_args: CLIPMoETrainingArguments) -> Path:
    """Train the routers of `script_args.model` on `script_args.data`; save the model, its processor and a
    model card in `training_args.output_dir`.

    Re-running continues an interrupted job from its last complete checkpoint, returns a finished one untouched,
    and refuses (`JobMismatchError`) one whose options, model or data differ.
    """
    output_dir = Path(training_args.output_dir)
    check_model_path(script_args.model)
    job = router_job(script_args, training_args)
    if job_already_done(job, training_args, f"Router training in {output_dir} is already complete; nothing to do."):
        return output_dir

    model = load_pretrained(
        script_args.model,
        AutoModel,
        trust_remote_code=script_args.trust_remote_code,
        require_moe=True,
        expert_dropout=script_args.expert_dropout,
    )
    processor = AutoProcessor.from_pretrained(script_args.model)
    dataset = load_image_text_dataset(script_args.data, streaming=script_args.streaming)
    job.record()
    # We push the final folder ourselves, with our model card; the Trainer would push every checkpoint with its own.
    trainer = CLIPMoETrainer(
        model=model,
        args=replace(training_args, push_to_hub=False),
        train_dataset=dataset,
        data_collator=ImageTextCollator(processor),
    )
    train_from_last_checkpoint(trainer, output_dir, "router training")
    trainer.save_model()

    def write_outputs():
        processor.save_pretrained(output_dir)
        _write_card(output_dir, script_args, training_args)

    return complete_job(trainer, job, training_args, write_outputs)


def _write_card(output_dir: Path, script_args, training_args) -> None:
    from ..cards import CardSpec, options_table, write_training_card

    options = result_options(script_args, training_args, exclude={"trust_remote_code"})
    how_built = (
        f"`hf-moe train-router`: the routers of `{script_args.model}` trained on `{script_args.data}` (every "
        "other weight frozen) with the CLIP contrastive loss plus the image and text balance losses "
        f"(`--balance_loss_weights {training_args.balance_loss_weights}`).\n\n{options_table(options)}"
    )
    card = CardSpec(base_model=script_args.model, how_built=how_built, tags=("clip", "clip-moe"))
    write_training_card(output_dir, training_args, card)


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser((RouterTrainingArguments, CLIPMoERouterTrainingArguments), prog="hf-moe train-router")
    script_args, training_args = parse_command_line(parser, argv)
    return train_router(script_args, training_args)

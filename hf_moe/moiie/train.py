# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoIIE training, stage 1 (`--stage pretrain`: the projector only) or stage 2 (`--stage finetune`: LLM + MoE +
projector; `--moe_only`: the MoE layers only), on LLaVA-format conversations.

    hf-moe train-moiie --model moiie-upcycled --data llava.json --image_folder images/ --output_dir out \
        --stage pretrain --max_steps 1000
    accelerate launch examples/moiie/train_moiie.py --model ... (the same options)

The data is checked before the job starts (`hf_moe.moiie.data.check_conversations`: turns, image files and paths,
`<image>` counts, `--max_length`, answer tokens), and `--model` must be a MoIIE; a refusal names the file, sample
and field, and writes nothing. A re-run continues the same job or refuses: the options and fingerprints of the
model, the JSON file and the image folder are recorded in `OUTPUT_DIR/hf_moe_job.json`; an interrupted run resumes
from its last complete checkpoint; a finished run is reported as done and left untouched. `--push_to_hub
--hub_model_id` pushes the final folder with its model card. `--lora_rank R` (stage finetune) trains PEFT LoRA
adapters on the decoder's attention and / or packed experts instead of their full weights (see
`hf_moe.moiie.lora`); checkpoints hold the adapters, the output folder the merged model, which loads without PEFT.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoProcessor, HfArgumentParser
from transformers.utils import logging

from ..arguments import parse_command_line
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
from .data import MoIIECollator, check_conversations, load_conversations
from .lora import LORA_TRAINABLE_PARAMETERS, MoIIELoraArguments, apply_lora, check_lora_stage
from .trainer import MoIIETrainer, MoIIETrainingArguments


logger = logging.get_logger(__name__)


@dataclass
class MoIIEScriptArguments:
    model: str = field(metadata={"help": "MoIIE folder or Hub id (e.g. the output of hf-moe upcycle-moiie)."})
    data: str = field(metadata={"help": "LLaVA-format conversation JSON file."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the JSON's image paths are relative to (default: the JSON's folder)."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Truncate longer samples to this many tokens."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow --model to run model code from its folder or Hub repo."}
    )
    allow_outside_image_paths: bool = field(
        default=False,
        metadata={
            "help": "Allow absolute image paths and '../' paths out of --image_folder in the data (refused by "
            "default: a data file should not make training read any file of the machine)."
        },
    )


# `data` and `image_folder` are compared by their fingerprints; trust_remote_code and allow_outside_image_paths do
# not change the result.
NOT_RESULT_OPTIONS = {"data", "image_folder", "trust_remote_code", "allow_outside_image_paths"}
MODEL_ROLE = (
    "`hf-moe train-moiie --model` (a MoIIE model: build one from a dense Phi-3 or Llama with "
    "`hf-moe upcycle-moiie --llm LLM --vision SIGLIP --output_dir DIR` and pass DIR)"
)


def moiie_job(
    script_args: MoIIEScriptArguments, training_args: MoIIETrainingArguments, lora_args: MoIIELoraArguments
) -> TrainingJob:
    """The MoIIE training job in `training_args.output_dir`: its options (the model by absolute path) and
    fingerprints of the model's weights, the JSON file and the image folder."""
    options = result_options(script_args, training_args, lora_args, exclude=NOT_RESULT_OPTIONS)
    options["model"] = local_path(script_args.model)
    inputs = {"model": model_fingerprint(script_args.model), "data": input_fingerprint(script_args.data)}
    if script_args.image_folder is not None:
        inputs["image_folder"] = input_fingerprint(script_args.image_folder)
    return TrainingJob(
        training_args.output_dir,
        "train-moiie",
        options,
        inputs=inputs,
        owned_outputs=("checkpoint-*", "model*.safetensors"),
    )


def train_moiie(
    script_args: MoIIEScriptArguments,
    training_args: MoIIETrainingArguments,
    lora_args: MoIIELoraArguments | None = None,
) -> Path:
    """Train `script_args.model` (stage `training_args.stage`) on `script_args.data`; save the model, its
    processor and a model card in `training_args.output_dir`.

    Re-running continues an interrupted job from its last complete checkpoint, returns a finished one untouched,
    and refuses (`JobMismatchError`) one whose options, model or data differ. With `lora_args.lora_rank > 0` the
    model trains through LoRA adapters and is saved merged.
    """
    lora_args = lora_args or MoIIELoraArguments()
    output_dir = Path(training_args.output_dir)
    config = load_config(script_args.model, trust_remote_code=script_args.trust_remote_code)
    check_model_type(config, script_args.model, {"moiie"}, MODEL_ROLE)
    check_lora_stage(lora_args, training_args)
    job = moiie_job(script_args, training_args, lora_args)
    if job_already_done(job, training_args, f"MoIIE training in {output_dir} is already complete; nothing to do."):
        return output_dir

    processor = AutoProcessor.from_pretrained(script_args.model, trust_remote_code=script_args.trust_remote_code)
    # Every sample is checked before anything is written: a bad one is refused by name, not hours into the run.
    dataset = load_conversations(
        script_args.data,
        script_args.image_folder,
        # unset: HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS decides, as for the other commands' image folders
        allow_outside_image_paths=script_args.allow_outside_image_paths or None,
    )
    check_conversations(
        dataset,
        processor,
        script_args.data,
        max_length=script_args.max_length,
        disable_progress=training_args.disable_tqdm or None,
    )
    model = load_pretrained(
        script_args.model, AutoModelForCausalLM, config=config, trust_remote_code=script_args.trust_remote_code
    )
    args = replace(training_args, push_to_hub=False)
    if lora_args.enabled:
        model = apply_lora(model, lora_args, training_args)
        args = replace(args, trainable_parameters=LORA_TRAINABLE_PARAMETERS)
    job.record()
    # We push the final folder ourselves, with our model card; the Trainer would push every checkpoint with its own.
    trainer = MoIIETrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=MoIIECollator(processor, max_length=script_args.max_length),
    )
    train_from_last_checkpoint(trainer, output_dir, "MoIIE training")
    if lora_args.enabled:
        # The Trainer would save the adapter only; users get a plain MoIIE folder that loads without PEFT.
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(output_dir)
    else:
        trainer.save_model()

    def write_outputs():
        processor.save_pretrained(output_dir)
        _write_card(output_dir, script_args, training_args, lora_args)

    return complete_job(trainer, job, training_args, write_outputs)


def _write_card(output_dir: Path, script_args, training_args, lora_args: MoIIELoraArguments) -> None:
    from ..cards import IMAGE_TEXT_TO_TEXT, CardSpec, options_table, write_training_card

    options = result_options(script_args, training_args, lora_args, exclude={"trust_remote_code"})
    trained = {
        "pretrain": "the projector trained (stage 1), every other weight frozen",
        "finetune": "the MoE layers' experts and routers trained (stage 2, --moe_only)"
        if training_args.moe_only
        else "the language model (MoE layers included) and the projector trained (stage 2)",
    }[training_args.stage]
    if lora_args.enabled:
        trained += (
            f", the decoder's {lora_args.lora_target} weights through rank-{lora_args.lora_rank} LoRA adapters "
            "(merged into this model)"
        )
    how_built = (
        f"`hf-moe train-moiie --stage {training_args.stage}`: {trained} on `{script_args.data}` with the LM "
        f"loss plus the vision and language balance losses.\n\n{options_table(options)}"
    )
    card = CardSpec(
        base_model=script_args.model,
        how_built=how_built,
        tags=("moiie", IMAGE_TEXT_TO_TEXT),
        pipeline_tag=IMAGE_TEXT_TO_TEXT,
    )
    write_training_card(output_dir, training_args, card)


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser(
        (MoIIEScriptArguments, MoIIETrainingArguments, MoIIELoraArguments), prog="hf-moe train-moiie"
    )
    script_args, training_args, lora_args = parse_command_line(parser, argv)
    return train_moiie(script_args, training_args, lora_args)

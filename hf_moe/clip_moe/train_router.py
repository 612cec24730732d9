"""Router training of a CLIP-MoE (the second phase of the CLIP-MoE recipe): only the routers train, with
loss = CLIP contrastive loss + router_aux_loss_coef * (image balance loss + text balance loss).

    hf-moe train-router --model clip-moe --data captions/ --output_dir clip-moe-routed --max_steps 1000
    accelerate launch examples/clip_moe/train_clip_moe.py --model clip-moe --data shards/ --output_dir out ...
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModel, AutoProcessor, HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..data import ImageTextCollator, load_image_text_dataset
from .trainer import CLIPMoETrainer, CLIPMoETrainingArguments


logger = logging.get_logger(__name__)


@dataclass
class RouterTrainingArguments:
    model: str = field(metadata={"help": "CLIP-MoE folder or Hub id (e.g. the output of hf-moe mcl: DIR/moe)."})
    data: str = field(metadata={"help": "Image-caption data (image folder with metadata.jsonl, img2dataset, shards)."})
    streaming: bool | None = field(default=None, metadata={"help": "Stream the data (default: for tar shards)."})
    expert_dropout: float = field(default=0.1, metadata={"help": "Dropout inside the experts while training."})


def train_router(script_args: RouterTrainingArguments, training_args: CLIPMoETrainingArguments) -> Path:
    """Train the routers of `script_args.model` on `script_args.data`; save the model and its processor in
    `training_args.output_dir`, resuming from the last checkpoint there if a previous run was interrupted."""
    model = AutoModel.from_pretrained(
        script_args.model, trust_remote_code=True, expert_dropout=script_args.expert_dropout
    )
    if not hasattr(model.config, "num_local_experts"):
        raise ValueError(
            f"{script_args.model} is a '{model.config.model_type}' model, not a CLIP-MoE: it has no routers."
        )
    processor = AutoProcessor.from_pretrained(script_args.model)
    dataset = load_image_text_dataset(script_args.data, streaming=script_args.streaming)
    trainer = CLIPMoETrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=ImageTextCollator(processor)
    )
    output_dir = Path(training_args.output_dir)
    last = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
    if last:
        logger.warning(f"Resuming router training from {last}")
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser((RouterTrainingArguments, CLIPMoETrainingArguments), prog="hf-moe train-router")
    script_args, training_args = parser.parse_args_into_dataclasses(argv)
    return train_router(script_args, training_args)

"""CLIP contrastive training with the `Trainer`, shared by every family that trains CLIP towers (CLIP-MoE's MCL stages
and router training, MoDE's data experts).

loss = CLIP contrastive loss (features all-gathered with gradient, label smoothing, fixed or learned logit scale)
       [+ what a subclass adds in `_additional_loss`, e.g. CLIP-MoE's balance losses]

Only the parameters matching `trainable_parameters` train (all of them by default). The contrastive loss goes to the
Trainer's `report_to` targets at `logging_steps`, accumulated on the device in between (`RecordedMetricsMixin`).

How the loss is averaged (independent of `gradient_accumulation_steps` k and of the number of processes W):
    contrastive  per micro-batch: the mean over the rows of one micro-batch gathered from all processes, scored
                 against all its columns (the negatives are that micro-batch's W x per_device_train_batch_size
                 pairs; accumulation does not add negatives). Each process returns the mean over its own rows; the
                 all-gather's backward sums every process' gradient into each one's features and DDP / DeepSpeed
                 average over processes, so the step is the gradient of the contrastive loss of the gathered
                 micro-batch (tests/test_loss_scaling.py checks 2 processes against 1 process on the gathered batch).
                 The Trainer divides the loss by k (`loss_is_scaled_for_ga = False`: no label tokens are counted),
                 so the k micro-batches of a step are averaged: effective weight 1 at any k and W.
    additions    (`_additional_loss`) are per-micro-batch, per-process terms and take the same division by k and
                 mean over processes; see `hf_moe.clip_moe.trainer`.
Under DeepSpeed the Trainer passes `scale_wrt_gas=False`, so its own division by k is the only one there too.
"""

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .arguments import CardArguments
from .losses import clip_contrastive_loss
from .training import RecordedMetricsMixin, freeze_all_but, share_process_group_with_deepspeed


logger = logging.get_logger(__name__)


@dataclass
class CLIPTrainingArguments(CardArguments, TrainingArguments):
    """`TrainingArguments` plus the contrastive loss's settings, which parameters train and the card's `--license`.
    The defaults are plain CLIP training (OpenCLIP / MetaCLIP): no label smoothing, the model's own learned logit
    scale, every parameter."""

    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the contrastive loss."})
    logit_scale: float | None = field(
        default=None,
        metadata={"help": "Fixed multiplier of the cosine logits; unset: the model's (learned) logit_scale.exp()."},
    )
    trainable_parameters: list[str] = field(
        default_factory=lambda: [".*"],
        metadata={"help": "Regexes; parameters whose name matches one train, all others are frozen ('.*': all)."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Image-text rows are collated by hand."})

    def __post_init__(self):
        super().__post_init__()
        if self.deepspeed:
            share_process_group_with_deepspeed()


class CLIPTrainer(RecordedMetricsMixin, Trainer):
    """`Trainer` computing the CLIP contrastive loss of a CLIP-like model (`image_embeds`, `text_embeds` and
    `logit_scale` in its outputs / parameters, as `transformers.CLIPModel`).

    Expects batches from `hf_moe.data.ImageTextCollator` (`input_ids`, `attention_mask`, `pixel_values`, and an
    optional `index` that is dropped here). Subclasses extend the loss through `_clip_outputs` (how the model is
    called) and `_additional_loss` (what is added to the contrastive loss).
    """

    # Every term is a per-micro-batch mean: the Trainer divides the loss by the accumulation steps (module docstring).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trainable = freeze_all_but(self.model, self.args.trainable_parameters)
        count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            f"Training {len(trainable)} tensors ({count:,} parameters) matching {self.args.trainable_parameters}"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key != "index"}
        outputs = self._clip_outputs(model, inputs)
        contrastive = clip_contrastive_loss(
            outputs.image_embeds, outputs.text_embeds, self._logit_scale(model), self.args.label_smoothing
        )
        record = model.training  # evaluation batches must not leak into the training log
        if record:
            self._record("contrastive_loss", contrastive)
        loss = contrastive + self._additional_loss(model, inputs, outputs, record)
        return (loss, outputs) if return_outputs else loss

    def _clip_outputs(self, model, inputs: dict):
        return model(**inputs)

    def _logit_scale(self, model) -> torch.Tensor | float:
        if self.args.logit_scale is not None:
            return self.args.logit_scale
        return self.accelerator.unwrap_model(model).logit_scale.exp()

    def _additional_loss(self, model, inputs: dict, outputs, record: bool) -> torch.Tensor | float:
        """Added to the contrastive loss (`record`: a training batch, whose metrics may be recorded)."""
        return 0.0


__all__ = ["CLIPTrainer", "CLIPTrainingArguments"]

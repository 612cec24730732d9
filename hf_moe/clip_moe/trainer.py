"""Trainer subclass for CLIP and CLIP-MoE: the recipe's contrastive loss plus the router balance loss.

loss = CLIP contrastive loss (features all-gathered with gradient, label smoothing, fixed logit scale)
       + router_aux_loss_coef * (image balance loss + text balance loss) [+ router_z_loss_coef * z-losses]

Only the parameters matching `trainable_parameters` train (the routers, by default; for a PEFT model pass
`hf_moe.clip_moe.lora.lora_trainable_parameters(lora_config)`). The contrastive loss,
the aux loss and each MoE layer's expert-load fractions go to the Trainer's `report_to` targets.
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..losses import clip_contrastive_loss
from ..modeling import expert_load
from ..training import freeze_all_but


logger = logging.get_logger(__name__)


@dataclass
class CLIPMoETrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the CLIP-MoE recipe's loss settings and which parameters train."""

    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the contrastive loss."})
    logit_scale: float | None = field(
        default=100.0,
        metadata={"help": "Fixed multiplier of the cosine logits (CLIP-MoE: 100 = exp(ln 100)); unset: the model's."},
    )
    trainable_parameters: list[str] = field(
        default_factory=lambda: [r"\.router\."],
        metadata={"help": "Regexes; parameters whose name matches one train, all others are frozen."},
    )
    log_expert_load: bool = field(default=True, metadata={"help": "Log each MoE layer's expert-load fractions."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Image-text rows are collated by hand."})


class CLIPMoETrainer(Trainer):
    """`Trainer` for CLIP-MoE router training and for MCL stages of a dense CLIP (no aux loss there).

    Expects batches from `hf_moe.data.ImageTextCollator` (`input_ids`, `attention_mask`, `pixel_values`, and an
    optional `index` that is dropped here).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trainable = freeze_all_but(self.model, self.args.trainable_parameters)
        count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            f"Training {len(trainable)} tensors ({count:,} parameters) matching {self.args.trainable_parameters}"
        )
        self._metric_sums = defaultdict(float)
        self._metric_counts = defaultdict(int)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key != "index"}
        config = self.accelerator.unwrap_model(model).config
        is_moe = hasattr(config, "num_local_experts")
        outputs = model(**inputs, output_router_logits=True) if is_moe else model(**inputs)
        if self.args.logit_scale is not None:
            logit_scale = self.args.logit_scale
        else:
            logit_scale = self.accelerator.unwrap_model(model).logit_scale.exp()
        contrastive = clip_contrastive_loss(
            outputs.image_embeds, outputs.text_embeds, logit_scale, self.args.label_smoothing
        )
        loss = contrastive
        self._record("contrastive_loss", contrastive)
        if is_moe:
            # The model owns the router terms (balance loss, z-loss) and their weights.
            loss = loss + outputs.router_loss
            self._record("aux_loss", outputs.aux_loss)
            self._record("router_loss", outputs.router_loss)
            if self.args.log_expert_load:
                self._record_expert_load(config, outputs, inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss

    def _record(self, name: str, value: torch.Tensor | float) -> None:
        self._metric_sums[name] += float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        self._metric_counts[name] += 1

    def _record_expert_load(self, config, outputs, attention_mask) -> None:
        top_k = config.num_experts_per_tok
        for tower, logits, mask in (
            ("vision", outputs.vision_router_logits, None),
            ("text", outputs.text_router_logits, attention_mask),
        ):
            if not logits:
                continue
            loads = expert_load(logits, top_k, mask)  # (num_moe_layers, num_experts)
            for layer, row in enumerate(loads.tolist()):
                for expert, fraction in enumerate(row):
                    self._record(f"expert_load/{tower}/layer_{layer}/expert_{expert}", fraction)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Fold the averages of what compute_loss recorded since the last log into this log entry.
        if self._metric_counts and "loss" in logs:
            for name, total in self._metric_sums.items():
                mean = torch.tensor(total / self._metric_counts[name], device=self.args.device)
                value = (
                    self.accelerator.reduce(mean, reduction="mean").item() if self.args.world_size > 1 else mean.item()
                )
                if not math.isnan(value):
                    logs[name] = round(value, 6)
            self._metric_sums.clear()
            self._metric_counts.clear()
        super().log(logs, *args, **kwargs)

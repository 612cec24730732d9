# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Trainer subclass for the two MoIIE training stages (METHODS.md section 4).

    pretrain  stage 1: the projector only (official: lr 5e-4);
    finetune  stage 2, visual instruction tuning: LLM (MoE layers included) + projector (official: lr 2e-5);
              `moe_only` trains the MoE layers' experts and routers only; `train_vision_tower` adds the
              vision tower (off by default).

loss = LM loss + router_aux_loss_coef (0.001) * the model's `aux_loss` (the vision + language balance losses; one loss
over all tokens for the `vanilla` variant), as the model computes it when `output_router_logits=True` (always passed
here). lm_loss, vision_aux_loss, language_aux_loss and each modality's expert load per MoE layer go to the Trainer's
`report_to` targets at `logging_steps`; they are accumulated on the device in between (one host synchronisation per
log); lm_loss is logged as the per-token mean of the accumulated all-process batch.

How each term is averaged, with k = `gradient_accumulation_steps` and W processes (tests/test_loss_scaling.py):
    LM loss          per token of the accumulated batch: the Trainer counts the label tokens of the k micro-batches
                     of a step on all W processes (`num_items_in_batch`, summed over processes with the default
                     `average_tokens_across_devices`), the model divides each micro-batch's summed token loss by that
                     count, and `compute_loss` multiplies it by W, as transformers' own `Trainer.compute_loss` does,
                     because DDP / DeepSpeed average the gradients over processes. Weight 1 at any k and W.
    balance losses   per micro-batch and per process: each Mixtral balance loss is over THIS micro-batch's tokens on
                     THIS process (padding excluded; not all-reduced over processes). The Trainer does not divide a
                     loss normalised by `num_items_in_batch` by k, so `compute_loss` divides these terms by k itself
                     (`hf_moe.training.per_micro_batch_scale`) and leaves them out of the factor W: the step takes
                     their mean over the k x W (micro-batch, process) pairs, with weight `router_aux_loss_coef`
                     (0.001) at any k and W. (Without `num_items_in_batch`, e.g. no labels, every term is a
                     per-micro-batch mean and the Trainer divides the whole loss by k.)
transformers' Mixtral, trained by the Trainer, adds its aux loss inside the model's loss, which the Trainer neither
divides by k nor spares from the factor W: its effective coefficient is router_aux_loss_coef x k x W. MoIIE did the
same for k (0.001 x k), and lacked the factor W on the LM loss (an LM weight of 1/W); both are fixed here.
Under DeepSpeed (ZeRO-1/2/3) the Trainer passes `scale_wrt_gas=False`, so the engine does not divide by its own
accumulation steps and averages gradients over data-parallel ranks like DDP: the same scaling is right there.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from ..arguments import CardArguments
from ..modeling import expert_load
from ..training import (
    RecordedMetricsMixin,
    freeze_all_but,
    per_micro_batch_scale,
    per_token_scale,
    share_process_group_with_deepspeed,
)


logger = logging.get_logger(__name__)

STAGES = ("pretrain", "finetune")
STAGE_LEARNING_RATES = {"pretrain": 5e-4, "finetune": 2e-5}
EXPERT_LOAD_LOGGING = ("none", "summary", "full")
PROJECTOR = r"multi_modal_projector\."
VISION_TOWER = r"vision_tower\."
MOE_PARAMETERS = r"\.mlp\.(experts|router|vision_router|language_router)\."


@dataclass
class MoIIETrainingArguments(CardArguments, TrainingArguments):
    """`TrainingArguments` plus the MoIIE stage (which parameters train), the stage's learning rate and the card's
    `--license`."""

    stage: Literal["pretrain", "finetune"] = field(
        default="finetune",
        metadata={"help": "'pretrain' (stage 1): projector only; 'finetune' (stage 2): LLM + MoE + projector."},
    )
    moe_only: bool = field(
        default=False, metadata={"help": "finetune: train only the MoE layers' experts and routers."}
    )
    train_vision_tower: bool = field(default=False, metadata={"help": "finetune: also train the vision tower."})
    trainable_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Regexes overriding the stage's trainable parameters (names matching one train)."},
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate; unset: the stage's (pretrain 5e-4, finetune 2e-5)."}
    )
    log_expert_load: Literal["none", "summary", "full"] = field(
        default="summary",
        metadata={
            "help": "Per-modality expert load at logging_steps. 'summary': per MoE layer and modality the most and "
            "least loaded expert's share relative to an even share (expert_load/vision/layer_1/max_ratio); "
            "'full': also every expert's share (.../layer_1/expert_0, global expert indices); 'none': off."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Conversations are collated by hand."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        if self.log_expert_load not in EXPERT_LOAD_LOGGING:
            raise ValueError(f"log_expert_load must be one of {EXPERT_LOAD_LOGGING}, got {self.log_expert_load!r}.")
        if self.stage == "pretrain" and (self.moe_only or self.train_vision_tower):
            raise ValueError(
                "moe_only and train_vision_tower apply to stage='finetune'; pretrain trains the projector only."
            )
        if self.learning_rate is None:
            self.learning_rate = STAGE_LEARNING_RATES[self.stage]
        super().__post_init__()
        if self.deepspeed:
            share_process_group_with_deepspeed()

    def stage_parameters(self) -> list[str]:
        """The regexes of the parameters this stage trains."""
        if self.trainable_parameters:
            return list(self.trainable_parameters)
        if self.stage == "pretrain":
            return [PROJECTOR]
        patterns = [MOE_PARAMETERS] if self.moe_only else [PROJECTOR, r"language_model\.", r"lm_head\."]
        return patterns + ([VISION_TOWER] if self.train_vision_tower else [])


def moe_block_classes(model: nn.Module) -> list[type]:
    """The classes of `model`'s MoE blocks: the modules holding an `experts` submodule (`MoIIESparseBlock`, or its
    remote-code copy, which is another class of the same name)."""
    classes = {type(module) for module in model.modules() if isinstance(getattr(module, "experts", None), nn.Module)}
    return sorted(classes, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def set_moe_blocks_as_zero3_leaves(model: PreTrainedModel) -> list[type]:
    """Make each MoE block a ZeRO-3 leaf: its parameters are gathered together when it is entered, not per submodule
    in a traced order that ranks whose tokens reach different experts need not share. Returns the classes (none for
    a dense model).

    DeepSpeed reduces a leaf's gradients in a backward hook on the block, which fires as soon as the gradient of the
    block's input is computed, or, when that input needs no gradient (`--moe_only`: everything below the first MoE
    layer is frozen), as soon as the block's output gradient arrives: before the experts' weight gradients exist, so
    they later land on re-partitioned parameters and the backward fails. Making the embeddings' output require grad
    (transformers' `enable_input_require_grads`) gives every block an input gradient to wait for.
    """
    classes = moe_block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
        model.enable_input_require_grads()
        logger.info(f"ZeRO-3 leaf modules: {', '.join(cls.__name__ for cls in classes)}")
    return classes


class MoIIETrainer(RecordedMetricsMixin, Trainer):
    """`Trainer` for MoIIE stage 1 / stage 2; batches from `hf_moe.moiie.data.MoIIECollator`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patterns = self.args.stage_parameters()
        trainable = freeze_all_but(self.model, patterns)
        # under ZeRO-3 a parameter's own tensor is this rank's partition; ds_numel is the full size
        count = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        logger.info(f"Stage {self.args.stage}: training {len(trainable)} tensors ({count:,} parameters) {patterns}")
        self._load_reach: dict[str, tuple[int, int]] = {}  # modality -> (first expert, number) its router reaches
        if is_deepspeed_zero3_enabled():  # DeepSpeed itself starts later, in train()
            set_moe_blocks_as_zero3_leaves(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, output_router_logits=True, **kwargs)
        config = self.accelerator.unwrap_model(model).config
        if getattr(outputs, "lm_loss", None) is None and outputs.loss is not None:
            raise ValueError(
                f"The model's output ({type(outputs).__name__}) carries no lm_loss: its code predates hf-moe's "
                "MoIIE output with the LM loss apart, as a folder's own modeling_moiie.py loaded with "
                "trust_remote_code=True may. Load it without trust_remote_code, so that hf-moe's code runs."
            )
        # The LM loss and the weighted balance losses, each with its own scale (module docstring).
        lm_loss = outputs.lm_loss
        balance = None if outputs.aux_loss is None else config.router_aux_loss_coef * outputs.aux_loss
        token_scale = per_token_scale(self, num_items_in_batch)
        loss = token_scale * lm_loss
        if balance is not None:
            loss = loss + per_micro_batch_scale(self, num_items_in_batch, model.training) * balance.to(loss.device)
        if model.training:  # evaluation batches must not leak into the training log
            # Logged as the per-token mean of the accumulated batch: a micro-batch's share times the micro-batches
            # (the log averages over micro-batches and processes).
            steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
            self._record("lm_loss", lm_loss * (token_scale * steps if num_items_in_batch is not None else 1))
            self._record("vision_aux_loss", outputs.vision_aux_loss)
            self._record("language_aux_loss", outputs.language_aux_loss)
            if self.args.log_expert_load != "none" and outputs.router_logits:
                self._record_expert_load(config, outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def _record_expert_load(self, config, outputs, inputs) -> None:
        """Each modality's share of routing slots per global expert, `(num_moe_layers, num_local_experts)`, from the
        logits of the router that routes that modality's tokens (`vision_router_logits` / `language_router_logits`)."""
        token_type_ids = inputs["token_type_ids"]
        valid = inputs.get("attention_mask", torch.ones_like(token_type_ids)).bool()
        masks = {"vision": valid & (token_type_ids == 1), "language": valid & (token_type_ids != 1)}
        num_experts, top_k = config.num_local_experts, config.num_experts_per_tok
        routers = {"vision": (outputs.vision_router_logits, 0), "language": (outputs.language_router_logits, 0)}
        widths = dict.fromkeys(masks, num_experts)
        if config.variant == "moiie":  # each router reaches a slice of the experts [vision..., shared..., language...]
            num_vision, num_shared = config.num_vision_experts, config.num_shared_experts
            routers["language"] = (outputs.language_router_logits, num_vision)
            widths = {"vision": num_vision + num_shared, "language": num_shared + config.num_language_experts}
        for modality, mask in masks.items():
            logits, offset = routers[modality]
            loads = expert_load(logits, top_k, mask.to(logits[0].device)).detach()
            full = loads.new_zeros(loads.shape[0], num_experts)
            full[:, offset : offset + widths[modality]] = loads
            self._load_reach[modality] = (offset, widths[modality])
            # a batch without this modality's tokens adds nothing (weight 0)
            self._record(f"expert_load/{modality}", full, weight=mask.any().to(full))

    def _logged_metrics(self) -> dict[str, float]:
        layers = self.accelerator.unwrap_model(self.model).config.moe_layer_indices()
        metrics = {}
        for name, (mean, seen) in self._pop_recorded().items():
            if not name.startswith("expert_load/"):
                metrics[name] = mean
                continue
            modality = name.split("/")[1]
            if seen <= 0:
                continue
            first, width = self._load_reach[modality]
            for layer, shares in zip(layers, mean):
                prefix = f"expert_load/{modality}/layer_{layer}"
                reachable = shares[first : first + width]
                metrics[f"{prefix}/max_ratio"] = max(reachable) * len(reachable)
                metrics[f"{prefix}/min_ratio"] = min(reachable) * len(reachable)
                if self.args.log_expert_load == "full":
                    metrics.update({f"{prefix}/expert_{e}": share for e, share in enumerate(shares)})
        return metrics


__all__ = [
    "MoIIETrainer",
    "MoIIETrainingArguments",
    "STAGES",
    "STAGE_LEARNING_RATES",
    "moe_block_classes",
    "set_moe_blocks_as_zero3_leaves",
]

# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""LoRA for MoIIE stage 2 with PEFT: the `--lora_*` options of `hf-moe train-moiie`, the `LoraConfig` they make,
and the Trainer patterns that go with it.

LoRA reaches two kinds of decoder weights:

* the attention projections (Phi-3: `qkv_proj`, `o_proj`; Llama: `q_proj`, `k_proj`, `v_proj`, `o_proj`):
  `nn.Linear`, PEFT's usual `target_modules`, matched under `language_model.layers` only so that the SigLIP
  tower's own `q_proj`/`k_proj`/`v_proj` stay untouched;
* the packed experts (`mlp.experts.gate_up_proj` `(E, 2I, H)`, `mlp.experts.down_proj` `(E, H, I)`: 3-D
  `nn.Parameter`s) through PEFT's `target_parameters`: PEFT wraps the experts module in a `lora.ParamWrapper` that,
  for the duration of each forward, parametrizes the parameter as `W + scaling * B_e @ A_e` (one rank-r pair per
  expert). The experts module and its `experts_implementation` stay in place and read the (adapted) parameter
  through the module attribute, so `eager`, `batched_mm` and `grouped_mm` all see the adapted weights.

What the stage trains besides the adapters (the routers, the projector unless `--moe_only`, the vision tower with
`--train_vision_tower`) is trained in full as PEFT `modules_to_save`, so that checkpoints (which hold the adapter
only) carry it and a resumed run continues with it; `merge_and_unload` folds everything back into a plain MoIIE.
"""

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig, PeftModel, get_peft_model
from transformers.utils import logging


logger = logging.get_logger(__name__)

LORA_TARGETS = ("attention", "experts", "all")
ATTENTION_PROJECTIONS = {"phi3": ("qkv_proj", "o_proj"), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER_MODULES = ["router", "vision_router", "language_router"]
# Trainer `trainable_parameters` of a PEFT-wrapped model: the LoRA factors and the trained copies of
# `modules_to_save` (not their frozen `original_module`).
LORA_TRAINABLE_PARAMETERS = [r"\.lora_[AB]\.", r"\.modules_to_save\."]


@dataclass
class MoIIELoraArguments:
    """The `--lora_*` options of `hf-moe train-moiie` (stage finetune only)."""

    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (per expert for the experts); 0: no LoRA."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the adapters are scaled by alpha / rank)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout; PEFT cannot apply it to the packed experts, so only --lora_target attention."},
    )
    lora_target: Literal["attention", "experts", "all"] = field(
        default="all",
        metadata={"help": "LoRA on the decoder's attention projections, on the packed experts, or on both."},
    )

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}.")
        if self.lora_target not in LORA_TARGETS:
            raise ValueError(f"lora_target must be one of {LORA_TARGETS}, got {self.lora_target!r}.")
        if self.lora_rank and self.lora_dropout and self.lora_target != "attention":
            raise ValueError(
                f"lora_dropout={self.lora_dropout}: PEFT cannot apply LoRA dropout to the packed experts (targeted "
                "through `target_parameters`, where lora_B(lora_A(dropout(x))) cannot be folded into the weight); "
                "use --lora_dropout 0 or --lora_target attention."
            )

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0


def check_lora_stage(lora_args: MoIIELoraArguments, training_args) -> None:
    """Refuse `--lora_*` options that contradict the stage (before anything is loaded or written)."""
    if not lora_args.enabled:
        return
    if training_args.stage != "finetune":
        raise ValueError(
            f"--lora_rank {lora_args.lora_rank} applies to --stage finetune; stage {training_args.stage!r} trains "
            "the projector only, which LoRA does not adapt."
        )
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "--lora_rank with DeepSpeed ZeRO-3 is not supported: the output is merged with PEFT's merge_and_unload, "
            "which needs whole (not partitioned) weights; use ZeRO-2 or train without LoRA."
        )
    if training_args.trainable_parameters:
        raise ValueError(
            "--trainable_parameters and --lora_rank exclude each other: with LoRA the adapters, the routers and the "
            "stage's projector / vision tower train."
        )
    if training_args.moe_only and lora_args.lora_target != "experts":
        raise ValueError(
            f"--moe_only trains the MoE layers only, but --lora_target {lora_args.lora_target!r} adapts attention; "
            "use --lora_target experts."
        )


def moiie_lora_config(config, lora_args: MoIIELoraArguments, training_args) -> LoraConfig:
    """The `LoraConfig` of `lora_args` for a MoIIE with config `config`, trained at `training_args`' stage."""
    decoder = config.text_config.model_type
    if decoder not in ATTENTION_PROJECTIONS:
        known = list(ATTENTION_PROJECTIONS)
        raise ValueError(f"No LoRA attention targets known for a {decoder!r} decoder; known: {known}.")
    attention = lora_args.lora_target in ("attention", "all")
    experts = lora_args.lora_target in ("experts", "all")
    if experts and config.variant == "dense":
        raise ValueError("--lora_target experts/all needs MoE layers, but the model's variant is 'dense'.")
    names = "|".join(ATTENTION_PROJECTIONS[decoder])
    modules_to_save = list(ROUTER_MODULES)
    if not training_args.moe_only:
        modules_to_save.append("multi_modal_projector")
    if training_args.train_vision_tower:
        modules_to_save.append("vision_tower")
    return LoraConfig(
        r=lora_args.lora_rank,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        # A regex (full match) rather than names: the vision tower has its own q_proj / k_proj / v_proj.
        # An empty list, not None, when only the experts are adapted: None makes PEFT look up default targets
        # for the model type, which it does not know.
        target_modules=rf".*language_model\.layers\.\d+\.self_attn\.({names})" if attention else [],
        target_parameters=list(EXPERT_PARAMETERS) if experts else None,
        modules_to_save=modules_to_save,
        bias="none",
    )


def apply_lora(model, lora_args: MoIIELoraArguments, training_args) -> PeftModel:
    """`model` wrapped with the LoRA adapters of `lora_args` (PEFT), its stage's other modules in `modules_to_save`."""
    check_lora_stage(lora_args, training_args)
    peft_model = get_peft_model(model, moiie_lora_config(model.config, lora_args, training_args))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(f"LoRA {lora_args.lora_target} rank {lora_args.lora_rank}: {trainable:,} of {total:,} parameters train")
    return peft_model


__all__ = [
    "ATTENTION_PROJECTIONS",
    "EXPERT_PARAMETERS",
    "LORA_TRAINABLE_PARAMETERS",
    "MoIIELoraArguments",
    "apply_lora",
    "check_lora_stage",
    "moiie_lora_config",
]

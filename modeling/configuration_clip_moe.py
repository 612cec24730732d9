# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""CLIP-MoE configuration: transformers' CLIP configs plus the mixture-of-experts fields."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.utils import logging

from .moe import MOE_FIELD_NAMES, MoEConfigFields


logger = logging.get_logger(__name__)

# Long-CLIP: 77 OpenAI positions stretched to 248 (20 kept + 56 x 4 interpolated + 4 extrapolated).
CLIP_TEXT_LENGTH = 77
LONG_CLIP_TEXT_LENGTH = 248
LONG_CLIP_KEPT_POSITIONS = 20


@strict
class CLIPMoETextConfig(CLIPTextConfig, MoEConfigFields):
    r"""Configuration of the CLIP-MoE text tower: [`CLIPTextConfig`] plus the MoE fields of
    `MoEConfigFields` (`num_local_experts`, `num_experts_per_tok`, `moe_layers`, ...)."""

    model_type = "clip_moe_text_model"
    base_config_key = "text_config"


@strict
class CLIPMoEVisionConfig(CLIPVisionConfig, MoEConfigFields):
    r"""Configuration of the CLIP-MoE vision tower: [`CLIPVisionConfig`] plus the MoE fields of
    `MoEConfigFields` (`num_local_experts`, `num_experts_per_tok`, `moe_layers`, ...)."""

    model_type = "clip_moe_vision_model"
    base_config_key = "vision_config"


@strict
class CLIPMoEConfig(CLIPConfig):
    r"""Configuration of [`CLIPMoEModel`], a CLIP whose transformer blocks use mixture-of-experts MLPs.

    The MoE fields below, when given, apply to both towers (the CLIP-MoE recipe uses one setting for both);
    left at `None` they are read from `text_config`. Which blocks are MoE is per tower: `moe_layers` in
    `text_config` / `vision_config` (default: every block).

    Args:
        text_config (`dict` or `CLIPMoETextConfig`, *optional*): The text tower.
        vision_config (`dict` or `CLIPMoEVisionConfig`, *optional*): The vision tower.
        num_local_experts (`int`, *optional*): Experts per MoE layer (CLIP-MoE release: 4).
        num_experts_per_tok (`int`, *optional*): Top-k (CLIP-MoE release: 2).
        norm_topk_prob (`bool`, *optional*): Renormalise the k routing weights.
        router_jitter_noise (`float`, *optional*): Multiplicative router-input noise in training.
        expert_dropout (`float`, *optional*): Dropout inside each expert (0.1 while training the router).
        router_aux_loss_coef (`float`, *optional*): Balance-loss weight (0.01).
        router_z_loss_coef (`float`, *optional*): Router z-loss weight (0, off).
        output_router_logits (`bool`, *optional*): Return router logits and the aux loss.
        long_text (`bool`, defaults to `False`): Long-CLIP text: 248 text positions instead of 77.

    Example:

    ```python
    >>> from hf_moe.modeling import CLIPMoEConfig, CLIPMoEModel
    >>> config = CLIPMoEConfig(num_local_experts=4, num_experts_per_tok=2, long_text=True)
    >>> model = CLIPMoEModel(config)
    ```"""

    model_type = "clip_moe"
    sub_configs_defaults = {"text_config": CLIPMoETextConfig, "vision_config": CLIPMoEVisionConfig}

    text_config: dict | CLIPMoETextConfig | None = None
    vision_config: dict | CLIPMoEVisionConfig | None = None
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    norm_topk_prob: bool | None = None
    router_jitter_noise: float | None = None
    expert_dropout: float | None = None
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None
    output_router_logits: bool | None = None
    long_text: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for tower in (self.text_config, self.vision_config):
            if not isinstance(tower, MoEConfigFields):
                raise TypeError(
                    f"{type(self).__name__} needs CLIP-MoE tower configs, got {type(tower).__name__}; "
                    "pass a dict or a CLIPMoETextConfig / CLIPMoEVisionConfig."
                )
        for name in MOE_FIELD_NAMES:
            value = getattr(self, name)
            # Given: pushed into both towers (by __setattr__); not given: read from the text tower.
            setattr(self, name, getattr(self.text_config, name) if value is None else value)
        if self.long_text:
            self.text_config.max_position_embeddings = LONG_CLIP_TEXT_LENGTH
        if not getattr(self, "auto_map", None):
            # Saved folders then load through every Auto class users reach for, pipelines included.
            self.auto_map = {
                "AutoConfig": "configuration_clip_moe.CLIPMoEConfig",
                "AutoModel": "modeling_clip_moe.CLIPMoEModel",
                "AutoModelForZeroShotImageClassification": "modeling_clip_moe.CLIPMoEModel",
            }

    def __setattr__(self, name, value):
        # A shared MoE field set on the joint config (also by `from_pretrained(..., expert_dropout=0.1)`)
        # applies to both towers, which are what the modules read.
        super().__setattr__(name, value)
        if name in MOE_FIELD_NAMES and value is not None:
            for tower in (getattr(self, "text_config", None), getattr(self, "vision_config", None)):
                if isinstance(tower, MoEConfigFields):
                    setattr(tower, name, value)

    def validate_moe(self):
        # The towers validated themselves; re-check after the shared fields were pushed into them.
        self.text_config.validate_moe()
        self.vision_config.validate_moe()


__all__ = [
    "CLIP_TEXT_LENGTH",
    "CLIPMoEConfig",
    "CLIPMoETextConfig",
    "CLIPMoEVisionConfig",
    "LONG_CLIP_KEPT_POSITIONS",
    "LONG_CLIP_TEXT_LENGTH",
]

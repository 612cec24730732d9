# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""CLIP-MoE configuration: transformers' CLIP configs plus the mixture-of-experts fields."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.utils import logging

from .moe import MoEConfigFields


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


def _joint_moe_field(name: str) -> property:
    """A joint-config view of the MoE field `name`, which lives in the towers (the modules read it there).

    Reading gives the towers' common value, or `None` when they differ; setting a value other than `None`
    sets it in both towers. Being a property, not a dataclass field, it is never written to config.json, so
    per-tower values come back from `from_pretrained` as they were saved.
    """

    def fget(self):
        towers = [self.__dict__.get("text_config"), self.__dict__.get("vision_config")]
        if not all(isinstance(tower, MoEConfigFields) for tower in towers):
            return None
        text_value, vision_value = (getattr(tower, name) for tower in towers)
        return text_value if text_value == vision_value else None

    def fset(self, value):
        if value is None:  # "not given", as in the constructor: the towers keep their own values
            return
        for tower in (self.__dict__.get("text_config"), self.__dict__.get("vision_config")):
            if isinstance(tower, MoEConfigFields):
                setattr(tower, name, value)

    return property(fget, fset, doc=f"`{name}` of both towers (`None` when they differ); setting it sets both.")


@strict
class CLIPMoEConfig(CLIPConfig):
    r"""Configuration of [`CLIPMoEModel`], a CLIP whose transformer blocks use mixture-of-experts MLPs.

    The MoE fields live in the towers (`text_config` / `vision_config`), which may differ: the CLIP-MoE
    recipe weighs the image balance loss 0.01 and the text balance loss 0.005, for example. The joint
    attributes below are views of the towers: given to the constructor, to `from_pretrained(...)` or set on
    the config, they set both towers; read, they give the towers' common value, or `None` when the towers
    differ (then read `config.text_config.<name>` / `config.vision_config.<name>`). Which blocks are MoE is
    per tower only: `moe_layers` in `text_config` / `vision_config` (default: every block).

    Args:
        text_config (`dict` or `CLIPMoETextConfig`, *optional*): The text tower.
        vision_config (`dict` or `CLIPMoEVisionConfig`, *optional*): The vision tower.
        num_local_experts (`int`, *optional*): Experts per MoE layer (CLIP-MoE release: 4).
        num_experts_per_tok (`int`, *optional*): Top-k (CLIP-MoE release: 2).
        norm_topk_prob (`bool`, *optional*): Renormalise the k routing weights.
        router_jitter_noise (`float`, *optional*): Multiplicative router-input noise in training.
        expert_dropout (`float`, *optional*): Dropout inside each expert (0.1 while training the router).
        router_aux_loss_coef (`float`, *optional*): Balance-loss weight of each tower (0.01).
        router_z_loss_coef (`float`, *optional*): Router z-loss weight of each tower (0, off).
        output_router_logits (`bool`, *optional*): Return router logits and the aux loss.
        long_text (`bool`, defaults to `False`): Long-CLIP text: 248 text positions instead of 77.

    Example:

    ```python
    >>> from hf_moe.modeling import CLIPMoEConfig, CLIPMoEModel
    >>> config = CLIPMoEConfig(num_local_experts=4, num_experts_per_tok=2, long_text=True)
    >>> config.vision_config.router_aux_loss_coef, config.text_config.router_aux_loss_coef = 0.01, 0.005
    >>> config.router_aux_loss_coef is None  # the towers differ
    True
    >>> model = CLIPMoEModel(config)
    ```"""

    model_type = "clip_moe"
    sub_configs_defaults = {"text_config": CLIPMoETextConfig, "vision_config": CLIPMoEVisionConfig}

    text_config: dict | CLIPMoETextConfig | None = None
    vision_config: dict | CLIPMoEVisionConfig | None = None
    long_text: bool = False

    # The joint MoE fields arrive as extra constructor kwargs, which `PreTrainedConfig.__post_init__` sets
    # once the towers exist, so these setters reach both towers.
    num_local_experts = _joint_moe_field("num_local_experts")
    num_experts_per_tok = _joint_moe_field("num_experts_per_tok")
    norm_topk_prob = _joint_moe_field("norm_topk_prob")
    router_jitter_noise = _joint_moe_field("router_jitter_noise")
    expert_dropout = _joint_moe_field("expert_dropout")
    router_aux_loss_coef = _joint_moe_field("router_aux_loss_coef")
    router_z_loss_coef = _joint_moe_field("router_z_loss_coef")
    output_router_logits = _joint_moe_field("output_router_logits")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for tower in (self.text_config, self.vision_config):
            if not isinstance(tower, MoEConfigFields):
                raise TypeError(
                    f"{type(self).__name__} needs CLIP-MoE tower configs, got {type(tower).__name__}; "
                    "pass a dict or a CLIPMoETextConfig / CLIPMoEVisionConfig."
                )
        if self.long_text:
            self.text_config.max_position_embeddings = LONG_CLIP_TEXT_LENGTH
        if not getattr(self, "auto_map", None):
            # Saved folders then load through every Auto class users reach for, pipelines included.
            self.auto_map = {
                "AutoConfig": "configuration_clip_moe.CLIPMoEConfig",
                "AutoModel": "modeling_clip_moe.CLIPMoEModel",
                "AutoModelForZeroShotImageClassification": "modeling_clip_moe.CLIPMoEModel",
            }

    def validate_moe(self):
        # The towers validated themselves; re-check after joint values were set in them.
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

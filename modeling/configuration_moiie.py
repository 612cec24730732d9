# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoIIE configuration: a LLaVA-shaped vision-language model (SigLIP vision tower, MLP projector, Phi-3
decoder) whose MoE decoder layers route vision and language tokens to intra- and inter-modality experts."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from .moe import resolve_moe_layers


MOIIE_VARIANTS = ("moiie", "vanilla", "modality", "dense")
VANILLA_BALANCE_LOSSES = ("all_tokens", "per_modality")
# text_config.model_type -> the model class (in modeling_moiie.py) that a saved folder's auto_map names.
MOIIE_TEXT_MODELS = {"phi3": "MoIIEPhi3ForCausalLM", "llama": "MoIIELlamaForCausalLM"}
PROJECTOR_TYPES = ("mlp2x_gelu",)


@strict
class MoIIEConfig(PreTrainedConfig):
    r"""Configuration of [`MoIIEPhi3ForCausalLM`] (Phi-3 text config) and [`MoIIELlamaForCausalLM`] (Llama).

    Experts of a MoE layer are packed in the order `[vision..., shared..., language...]`. Under `variant="moiie"`
    vision tokens are routed (top-k) over the vision + shared experts and language tokens over the shared +
    language experts, by two bias-free routers; `"vanilla"`: one router over all experts for every token;
    `"modality"`: vision tokens go to the first vision expert, language tokens to the first language expert, no
    router; `"dense"`: the decoder's plain MLP everywhere.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): The vision tower (SigLIP vision by default).
        text_config (`dict` or `PreTrainedConfig`, *optional*): The decoder: Phi-3 (default) or Llama.
        moe_layers (`int` or `list[int]`, *optional*): Which decoder layers have MoE MLPs, as in every hf-moe config
            (`moe.resolve_moe_layers`): an `int` n, the last n layers; a list, those indices; `None`, MoIIE's
            default, every other layer from index 1 (the odd indices). An `int` or `None` is stored as the list.
        num_vision_experts (`int`, defaults to 1): Vision-only experts per MoE layer.
        num_shared_experts (`int`, defaults to 2): Experts both modalities can reach.
        num_language_experts (`int`, defaults to 1): Language-only experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 2): Top-k of every router.
        router_jitter_noise (`float`, defaults to 0.0): Multiplicative uniform noise in [1 - j, 1 + j] on the MoE
            layer's input in training (routed variants), as the official code and transformers' Mixtral apply it:
            the routers and the experts both see the noised input.
        variant (`str`, defaults to `"moiie"`): `"moiie"`, `"vanilla"`, `"modality"` or `"dense"`.
        router_aux_loss_coef (`float`, defaults to 0.001): Weight of each balance loss (`"moiie"`: the vision and the
            language router's; `"vanilla"`: its router's).
        vanilla_balance_loss (`str`, defaults to `"all_tokens"`): The balance loss of `"vanilla"`: `"all_tokens"`,
            one loss over all non-padding tokens of its single router (the official vanilla MoE); `"per_modality"`,
            one over the vision tokens plus one over the language tokens (as `"moiie"` counts them; about twice the
            official penalty). Ignored by the other variants.
        output_router_logits (`bool`, defaults to `False`): Return router logits and the balance losses.
        image_token_id (`int`, defaults to 32044): The placeholder token replaced by image features.
        vision_feature_layer (`int`, defaults to -2): Vision-tower hidden layer fed to the projector.
        projector_type (`str`, defaults to `"mlp2x_gelu"`): Linear -> GELU -> Linear.
    """

    model_type = "moiie"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    moe_layers: int | list[int] | None = None
    num_vision_experts: int = 1
    num_shared_experts: int = 2
    num_language_experts: int = 1
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.0
    variant: str = "moiie"
    router_aux_loss_coef: float = 0.001
    vanilla_balance_loss: str = "all_tokens"
    output_router_logits: bool = False
    image_token_id: int = 32044
    vision_feature_layer: int = -2
    projector_type: str = "mlp2x_gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.moe_layers, list):
            # Stored as the indices it resolves to (as MoIIE configs always stored them), so that config.json names
            # the layers whatever form they were given in.
            self.moe_layers = self.moe_layer_indices()
        if self.text_config.model_type not in MOIIE_TEXT_MODELS:
            raise ValueError(
                f"text_config.model_type must be one of {tuple(MOIIE_TEXT_MODELS)}, "
                f"got {self.text_config.model_type!r}."
            )
        if not getattr(self, "auto_map", None):
            # One config class, one model class per text decoder: the auto_map of each config names its own.
            model_class = f"modeling_moiie.{MOIIE_TEXT_MODELS[self.text_config.model_type]}"
            self.auto_map = {
                "AutoConfig": "configuration_moiie.MoIIEConfig",
                "AutoModelForCausalLM": model_class,
                "AutoModelForImageTextToText": model_class,
            }
        if "AutoModelForCausalLM" in self.auto_map:  # ours, also in folders saved before AutoModel was mapped
            self.auto_map.setdefault("AutoModel", "modeling_moiie.MoIIEModel")
        self.validate_moe()

    def moe_layer_indices(self) -> list[int]:
        """The indices of the MoE decoder layers, resolved from `moe_layers`."""
        num_layers = self.text_config.num_hidden_layers
        return resolve_moe_layers(self.moe_layers, num_layers, default=list(range(1, num_layers, 2)))

    @property
    def num_local_experts(self) -> int:
        """Experts per MoE layer: vision + shared + language."""
        return self.num_vision_experts + self.num_shared_experts + self.num_language_experts

    def validate_moe(self):
        """Raise a `ValueError` naming the offending field when the MoE fields are inconsistent."""
        if self.variant not in MOIIE_VARIANTS:
            raise ValueError(f"variant must be one of {MOIIE_VARIANTS}, got {self.variant!r}.")
        if self.vanilla_balance_loss not in VANILLA_BALANCE_LOSSES:
            raise ValueError(
                f"vanilla_balance_loss must be one of {VANILLA_BALANCE_LOSSES}, got {self.vanilla_balance_loss!r}."
            )
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}.")
        for name in ("num_vision_experts", "num_shared_experts", "num_language_experts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}.")
        self.moe_layer_indices()  # validates moe_layers (set after the config was built, too)
        if self.variant == "dense":
            return
        if self.variant == "modality":
            if self.num_vision_experts < 1 or self.num_language_experts < 1:
                raise ValueError(
                    "variant='modality' needs at least one vision and one language expert, got "
                    f"num_vision_experts={self.num_vision_experts}, num_language_experts={self.num_language_experts}."
                )
            return
        routers = {"vanilla": {"the router": self.num_local_experts}}.get(
            self.variant,
            {
                "the vision router (num_vision_experts + num_shared_experts)": self.num_vision_experts
                + self.num_shared_experts,
                "the language router (num_shared_experts + num_language_experts)": self.num_shared_experts
                + self.num_language_experts,
            },
        )
        for router, count in routers.items():
            if not 1 <= self.num_experts_per_tok <= count:
                raise ValueError(
                    f"num_experts_per_tok (top-k) must be between 1 and the {count} experts of {router}, "
                    f"got {self.num_experts_per_tok}."
                )
        if self.router_jitter_noise < 0:
            raise ValueError(f"router_jitter_noise must not be negative, got {self.router_jitter_noise}.")


__all__ = ["MOIIE_TEXT_MODELS", "MOIIE_VARIANTS", "VANILLA_BALANCE_LOSSES", "MoIIEConfig"]

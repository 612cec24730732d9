# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoIIE: a LLaVA-shaped vision-language model (SigLIP -> MLP projector -> Phi-3) whose MoE decoder layers
route vision tokens over vision + shared experts and language tokens over shared + language experts.

Saved folders carry this file, configuration_moiie.py and the sibling files they import (moe.py, weight_init.py,
model_card.py), so `trust_remote_code=True` loads them anywhere.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3Model
from transformers.utils import can_return_tuple, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, select_hidden_states

from .configuration_moiie import MOIIE_TEXT_MODELS, MoIIEConfig
from .model_card import KeepModelCardMixin
from .moe import (
    MoEGatedExperts,
    MoESparseBlock,
    MoETopKRouter,
    load_balancing_loss,
    note_packed_experts_stay_unquantized,
)
from .weight_init import InitializeAsTransformersMixin


@dataclass
class MoIIEModelOutputWithPast(BaseModelOutputWithPast):
    r"""router_logits: per MoE layer, in layer order, the logits of its routers over all tokens (`"moiie"`: the
    vision router's then the language router's; `"vanilla"`: the one router's). image_hidden_states: projected
    image features, `(num_images, tokens_per_image, hidden_size)`. image_outputs: the vision tower's output as
    [`MoIIEModel.get_image_features`] returns it (as LLaVA's `image_outputs`; `pooler_output` holds the projected
    features)."""

    router_logits: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class MoIIECausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""loss: LM loss + router_aux_loss_coef * aux_loss when router logits are output.
    aux_loss: the unweighted balance losses the loss adds, summed: `"moiie"`, vision_aux_loss + language_aux_loss;
    `"vanilla"`, its one loss over all non-padding tokens (`vanilla_balance_loss="all_tokens"`, the official) or
    vision_aux_loss + language_aux_loss (`"per_modality"`).
    vision_aux_loss / language_aux_loss: Mixtral balance loss over all MoE layers of the non-padding vision /
    language tokens, on the vision / language router under `"moiie"`, on the single router under `"vanilla"` with
    `"per_modality"`; None when they are not part of the loss (`"vanilla"` with `"all_tokens"`, or no router).
    router_logits, image_hidden_states, image_outputs: as in [`MoIIEModelOutputWithPast`].
    lm_loss: the LM loss alone (with labels), so that a trainer weighs the two terms without taking one back out.
    vision_router_logits / language_router_logits: per MoE layer, the logits of the router that routes the vision /
    language tokens (`"moiie"`: the vision / language router's; `"vanilla"`: the one router's, in both), as the
    balance losses read them."""

    router_logits: tuple[torch.Tensor, ...] | None = None
    vision_aux_loss: torch.Tensor | None = None
    language_aux_loss: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None
    # Each field added after those before it, so their tuple positions stay as they were.
    aux_loss: torch.Tensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    lm_loss: torch.Tensor | None = None
    vision_router_logits: tuple[torch.Tensor, ...] | None = None
    language_router_logits: tuple[torch.Tensor, ...] | None = None


# The routers of a MoE layer under each variant, in the order `MoIIESparseBlock.route` calls them, which is the order of
# their logits in `router_logits` (recorded as they run); and the router that routes each modality's tokens.
ROUTER_NAMES = {"moiie": ("vision_router", "language_router"), "vanilla": ("router",), "modality": (), "dense": ()}
MODALITY_ROUTERS = {
    "moiie": {"vision": "vision_router", "language": "language_router"},
    "vanilla": {"vision": "router", "language": "router"},
}


class MoIIESparseBlock(MoESparseBlock):
    """The MoE MLP of a MoIIE decoder layer (moe.py's block with MoIIE's routing): gated experts ordered
    [vision..., shared..., language...]; `"moiie"`: a vision router over the vision + shared experts and a language
    router over the shared + language experts; `"vanilla"`: one router over all; `"modality"`: no router."""

    # As the official code and transformers' Mixtral: the layer input itself is scaled, so the experts compute on the
    # noised tokens too (not only the routers).
    jitter_reaches_experts = True

    def __init__(self, config: MoIIEConfig, text_config):
        top_k = config.num_experts_per_tok
        reach = {
            "vision_router": config.num_vision_experts + config.num_shared_experts,
            "language_router": config.num_shared_experts + config.num_language_experts,
            "router": config.num_local_experts,
        }
        routers = {
            name: MoETopKRouter(text_config, num_experts=reach[name], top_k=top_k, norm_topk_prob=True)
            for name in ROUTER_NAMES[config.variant]
        }
        super().__init__(
            config,
            routers=routers,
            experts=MoEGatedExperts(text_config, config.num_local_experts),
            jitter_noise=0.0 if config.variant == "modality" else config.router_jitter_noise,
        )
        self.variant = config.variant
        self.num_vision = config.num_vision_experts
        self.num_shared = config.num_shared_experts

    def route(self, hidden_states: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_vision = token_type_ids.reshape(-1, 1).to(hidden_states.device) == 1
        # (top_k_weights, top_k_index) of each router, called in ROUTER_NAMES order (see there).
        routed = {name: self.get_submodule(name)(hidden_states)[1:] for name in ROUTER_NAMES[self.variant]}
        if self.variant == "moiie":
            vision_weights, vision_index = routed["vision_router"]
            language_weights, language_index = routed["language_router"]
            top_k_index = torch.where(is_vision, vision_index, language_index + self.num_vision)
            top_k_weights = torch.where(is_vision, vision_weights, language_weights)
        elif self.variant == "vanilla":
            top_k_weights, top_k_index = routed["router"]
        else:  # "modality": the first vision expert, or the first language expert
            top_k_index = torch.where(is_vision, 0, self.num_vision + self.num_shared)
            top_k_weights = torch.ones(top_k_index.shape, device=hidden_states.device)
        return top_k_index, top_k_weights.to(hidden_states.dtype)


# Older name of the gated experts, which moved to moe.py.
MoIIEExperts = MoEGatedExperts


def modality_router_logits(variant: str, router_logits: tuple[torch.Tensor, ...] | None):
    """`{"vision": ..., "language": ...}`: per MoE layer, the logits of the router that routes that modality's tokens,
    split from `router_logits` (all routers of every MoE layer, as recorded) by `ROUTER_NAMES`; `None` for a variant
    without routers or without logits."""
    if not router_logits or variant not in MODALITY_ROUTERS:
        return None
    names = ROUTER_NAMES[variant]
    by_router = {name: tuple(router_logits[i :: len(names)]) for i, name in enumerate(names)}
    return {modality: by_router[name] for modality, name in MODALITY_ROUTERS[variant].items()}


class MoIIEDecoderLayerMixin:
    """Mixed into a decoder layer class (Phi-3's, Llama's): in MoE layers its MLP is a [`MoIIESparseBlock`] fed the
    tokens' modality. Phi-3's residual dropouts are applied where the layer has them."""

    def __init__(self, text_config, layer_idx: int, config: MoIIEConfig):
        super().__init__(text_config, layer_idx)
        self.is_moe = config.variant != "dense" and layer_idx in config.moe_layer_indices()
        if self.is_moe:
            self.mlp = MoIIESparseBlock(config, text_config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        token_type_ids=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + self._dropout("resid_attn_dropout", hidden_states)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            if token_type_ids is None:  # decode steps and text-only calls: language tokens
                token_type_ids = torch.zeros(hidden_states.shape[:-1], dtype=torch.long, device=hidden_states.device)
            hidden_states = self.mlp(hidden_states, token_type_ids)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + self._dropout("resid_mlp_dropout", hidden_states)

    def _dropout(self, name: str, hidden_states: torch.Tensor) -> torch.Tensor:
        dropout = getattr(self, name, None)
        return hidden_states if dropout is None else dropout(hidden_states)


class MoIIEPhi3DecoderLayer(MoIIEDecoderLayerMixin, Phi3DecoderLayer):
    """Phi-3's decoder layer with MoIIE MoE MLPs."""


class MoIIELlamaDecoderLayer(MoIIEDecoderLayerMixin, LlamaDecoderLayer):
    """Llama's decoder layer with MoIIE MoE MLPs."""


def _init_moiie_module(module, std: float):
    if isinstance(module, MoEGatedExperts):
        init.normal_(module.gate_up_proj, std=std)
        init.normal_(module.down_proj, std=std)
    elif isinstance(module, MoETopKRouter):
        init.normal_(module.weight, std=std)


class MoIIETextModelMixin:
    """Mixed into a decoder model class: its layers are `decoder_layer_class` (a [`MoIIEDecoderLayerMixin`]);
    `token_type_ids` (1 = image) reach the MoE MLPs."""

    decoder_layer_class = None

    def __init__(self, text_config, config: MoIIEConfig):
        super().__init__(text_config)
        layer = self.decoder_layer_class
        self.layers = nn.ModuleList([layer(text_config, i, config) for i in range(text_config.num_hidden_layers)])
        self._can_record_outputs = {
            "hidden_states": layer,
            **{k: v for k, v in self._can_record_outputs.items() if k != "hidden_states"},
        }
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # the experts decorator is in this file, not in the decoder's

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        _init_moiie_module(module, self.config.initializer_range)


class MoIIEPhi3TextModel(MoIIETextModelMixin, Phi3Model):
    """transformers' Phi-3 decoder with [`MoIIEPhi3DecoderLayer`]s."""

    decoder_layer_class = MoIIEPhi3DecoderLayer
    _can_record_outputs = {**Phi3Model._can_record_outputs, "router_logits": OutputRecorder(MoETopKRouter, index=0)}


class MoIIELlamaTextModel(MoIIETextModelMixin, LlamaModel):
    """transformers' Llama decoder with [`MoIIELlamaDecoderLayer`]s."""

    decoder_layer_class = MoIIELlamaDecoderLayer
    _can_record_outputs = {**LlamaModel._can_record_outputs, "router_logits": OutputRecorder(MoETopKRouter, index=0)}


TEXT_MODELS = {"phi3": MoIIEPhi3TextModel, "llama": MoIIELlamaTextModel}


class MoIIEProjector(nn.Module):
    """`mlp2x_gelu`: Linear -> GELU -> Linear from the vision width to the decoder width."""

    def __init__(self, config: MoIIEConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class MoIIEPreTrainedModel(KeepModelCardMixin, InitializeAsTransformersMixin, PreTrainedModel):
    # InitializeAsTransformersMixin: SigLIP's attention and MLP blocks own no parameters, so transformers' custom-code
    # heuristic would leave a tower missing from a checkpoint with the generic Linear init.
    config: MoIIEConfig
    config_class = MoIIEConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoIIEPhi3DecoderLayer", "MoIIELlamaDecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True  # SigLIP, Phi-3 and Llama all take it, as they do in LLaVA
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # transformers looks for the experts decorator in this file's source

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        _init_moiie_module(module, self.config.text_config.initializer_range)


class MoIIEModel(MoIIEPreTrainedModel):
    """Vision tower, projector and MoIIE decoder (Phi-3 or Llama, by `text_config.model_type`; no LM head)."""

    def __init__(self, config: MoIIEConfig):
        super().__init__(config)
        # `from_pretrained(..., experts_implementation=...)` sets it on every sub-config; the vision tower has no
        # experts and refuses any (only the decoder's MoE layers use it).
        config.vision_config._experts_implementation_internal = None
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = MoIIEProjector(config)
        self.language_model = TEXT_MODELS[config.text_config.model_type](config.text_config, config)
        self.post_init()

    def post_init(self):
        super().post_init()
        note_packed_experts_stay_unquantized(self)  # here only: the causal LMs wrap this model, one note per load

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None, **kwargs
    ) -> tuple | BaseModelOutputWithPooling:
        """The vision tower's output (as LLaVA's `get_image_features`), its `pooler_output` the projected features of
        hidden layer `vision_feature_layer` (default: the config's): `(num_images, tokens_per_image, hidden_size)`.
        Takes the vision tower's `output_hidden_states` / `output_attentions` / `return_dict`."""
        image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        image_outputs.pooler_output = self.multi_modal_projector(image_outputs.hidden_states[vision_feature_layer])
        return image_outputs

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, seq)` bool mask of the image placeholders: from `input_ids`, or (without them) the positions of
        `inputs_embeds` that hold the image token's embedding, as LLaVA finds them."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        token_type_ids=None,
        use_cache=None,
        output_router_logits=None,
        **kwargs,
    ) -> MoIIEModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if token_type_ids is None or token_type_ids.shape != inputs_embeds.shape[:-1]:
            token_type_ids = self.get_placeholder_mask(input_ids, inputs_embeds).long()
        image_mask = token_type_ids == 1
        image_outputs = image_features = None
        if pixel_values is not None:
            vision_kwargs = {key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs}
            image_outputs = self.get_image_features(
                pixel_values.to(self.vision_tower.dtype), return_dict=True, **vision_kwargs
            )
            image_features = image_outputs.pooler_output
            # A tensor check, not a Python int: torch.export / torch.compile trace through it (LLaVA's check). ONNX
            # has no operator for a traced tensor check (LLaVA's export fails on it), so an ONNX export leaves it out.
            torch_compilable_check(
                torch.onnx.is_in_onnx_export() or image_mask.sum() * image_features.shape[-1] == image_features.numel(),
                lambda: (
                    f"Image features and image tokens do not match: {image_features.shape[0]} image(s) of "
                    f"{image_features.shape[1]} tokens give {image_features.shape[0] * image_features.shape[1]} "
                    f"features, but the batch holds {int(image_mask.sum())} image tokens "
                    f"(image_token_id={self.config.image_token_id})."
                ),
            )
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.unsqueeze(-1).to(inputs_embeds.device), image_features.to(inputs_embeds.dtype)
            )
        # Image tokens without pixel_values run as their placeholder embeddings, as LLaVA runs them.
        elif self.training and (
            (torch.distributed.is_available() and torch.distributed.is_initialized())
            or any(param.requires_grad for param in self.multi_modal_projector.parameters())
        ):
            # The other processes' batches may hold images: their ZeRO gathers / DDP reductions over the vision
            # tower's and projector's parameters wait for ours, so a text-only batch runs them too, on a blank image
            # whose features enter with weight 0 (the result is unchanged, the gradients are zero, not missing).
            # On one process too while the projector trains: in stage 1 it is all that trains, and a text-only
            # batch's loss would otherwise reach no trainable parameter (backward fails).
            vision = self.config.vision_config
            blank = torch.zeros(
                1, vision.num_channels, vision.image_size, vision.image_size, device=inputs_embeds.device
            )
            unused = self.get_image_features(blank.to(self.vision_tower.dtype)).pooler_output.sum()
            inputs_embeds = inputs_embeds + 0 * unused.to(inputs_embeds.dtype)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            token_type_ids=token_type_ids,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        return MoIIEModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.get("router_logits"),
            image_hidden_states=image_features,
            image_outputs=image_outputs,
        )


class MoIIEForCausalLM(MoIIEPreTrainedModel, GenerationMixin):
    """MoIIE with its decoder (Phi-3 or Llama, by `text_config.model_type`) and LM head; the code shared by
    [`MoIIEPhi3ForCausalLM`] and [`MoIIELlamaForCausalLM`]. `MoIIEForCausalLM.from_pretrained` / `_from_config`
    (what the in-process Auto mapping of `MoIIEConfig` calls) return the subclass of the config's decoder.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/moiie", trust_remote_code=True)
    >>> out = model(input_ids=ids, pixel_values=pixels, labels=ids, output_router_logits=True)
    >>> out.loss, out.aux_loss, out.vision_aux_loss, out.language_aux_loss
    ```"""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Phi-3's / Llama's / LLaVA's own head plan: with the decoder's `embed_tokens` sharded, an unsharded (possibly
    # tied) head would take a DTensor weight in F.linear.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    text_model_type = None  # the decoder this class requires; None: any

    def __init__(self, config: MoIIEConfig):
        if self.text_model_type is not None and config.text_config.model_type != self.text_model_type:
            raise ValueError(
                f"{type(self).__name__} needs a {self.text_model_type!r} text_config, got "
                f"{config.text_config.model_type!r}; use {MOIIE_TEXT_MODELS[config.text_config.model_type]}."
            )
        super().__init__(config)
        self.model = MoIIEModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _for_config(cls, config):
        if cls is not MoIIEForCausalLM or not isinstance(config, MoIIEConfig):
            return cls
        return {"phi3": MoIIEPhi3ForCausalLM, "llama": MoIIELlamaForCausalLM}[config.text_config.model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if cls is MoIIEForCausalLM and not isinstance(config, MoIIEConfig):
            config = MoIIEConfig.from_pretrained(pretrained_model_name_or_path)
        return super(MoIIEForCausalLM, cls._for_config(config)).from_pretrained(
            pretrained_model_name_or_path, *args, config=config, **kwargs
        )

    @classmethod
    def _from_config(cls, config, **kwargs):
        return super(MoIIEForCausalLM, cls._for_config(config))._from_config(config, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None, **kwargs):
        """[`MoIIEModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, vision_feature_layer=vision_feature_layer, **kwargs)

    def modality_masks(self, token_type_ids, attention_mask):
        """Float `(batch, seq)` masks of the non-padding vision and language tokens."""
        valid = torch.ones_like(token_type_ids, dtype=torch.bool)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -token_type_ids.shape[1] :].bool()
        return (valid & (token_type_ids == 1)).float(), (valid & (token_type_ids != 1)).float()

    def balance_losses(self, router_logits, token_type_ids, attention_mask):
        """(vision_aux_loss, language_aux_loss, aux_loss): unweighted Mixtral balance losses over the tokens of all MoE
        layers, padding excluded; aux_loss is their sum, the term the loss weighs by `router_aux_loss_coef` (see
        [`MoIIECausalLMOutputWithPast`]). `"vanilla"` with `vanilla_balance_loss="all_tokens"` (the official):
        `(None, None, one loss over all non-padding tokens)`."""
        config = self.config
        if not router_logits:
            return None, None, None
        vision_mask, language_mask = self.modality_masks(token_type_ids, attention_mask)
        if config.variant == "vanilla" and config.vanilla_balance_loss == "all_tokens":
            mask = vision_mask + language_mask
            if mask.sum() == 0:
                return None, None, torch.zeros((), device=router_logits[0].device)
            loss = load_balancing_loss(router_logits, config.num_local_experts, config.num_experts_per_tok, mask)
            return None, None, loss
        by_modality = modality_router_logits(config.variant, router_logits)
        if config.variant == "moiie":
            vision_experts = config.num_vision_experts + config.num_shared_experts
            language_experts = config.num_shared_experts + config.num_language_experts
        else:
            vision_experts = language_experts = config.num_local_experts
        losses = []
        for logits, experts, mask in (
            (by_modality["vision"], vision_experts, vision_mask),
            (by_modality["language"], language_experts, language_mask),
        ):
            if mask.sum() == 0:
                losses.append(torch.zeros((), device=logits[0].device))
            else:
                losses.append(load_balancing_loss(logits, experts, config.num_experts_per_tok, mask))
        return losses[0], losses[1], losses[0] + losses[1]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        token_type_ids=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoIIECausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # Decode steps are language tokens, even when `generate()` extends given `token_type_ids` by repeating the
        # prompt's last value (a prompt ending on an image token would otherwise route its answer as vision).
        decoding = cache is not None and cache.get_seq_length() > 0 and pixel_values is None
        if input_ids is not None and (decoding or token_type_ids is None or token_type_ids.shape != input_ids.shape):
            token_type_ids = (
                torch.zeros_like(input_ids) if decoding else (input_ids == self.config.image_token_id).long()
            )
        elif input_ids is None and token_type_ids is None and not decoding:
            # The balance losses need the modality of every token too.
            token_type_ids = self.model.get_placeholder_mask(None, inputs_embeds).long()
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = lm_loss = None
        if labels is not None:
            loss = lm_loss = self.loss_function(logits, labels, self.config.text_config.vocab_size, **kwargs)
        vision_aux_loss = language_aux_loss = aux_loss = None
        if output_router_logits and outputs.router_logits:
            if token_type_ids is None:
                token_type_ids = torch.zeros(hidden_states.shape[:-1], dtype=torch.long, device=hidden_states.device)
            vision_aux_loss, language_aux_loss, aux_loss = self.balance_losses(
                outputs.router_logits, token_type_ids, attention_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        by_modality = modality_router_logits(self.config.variant, outputs.router_logits) or {}
        return MoIIECausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            aux_loss=aux_loss,
            vision_aux_loss=vision_aux_loss,
            language_aux_loss=language_aux_loss,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            lm_loss=lm_loss,
            vision_router_logits=by_modality.get("vision"),
            language_router_logits=by_modality.get("language"),
        )


class MoIIEPhi3ForCausalLM(MoIIEForCausalLM):
    """MoIIE with a Phi-3 decoder (SigLIP -> mlp2x_gelu -> Phi-3 with vision / shared / language experts)."""

    text_model_type = "phi3"


class MoIIELlamaForCausalLM(MoIIEForCausalLM):
    """MoIIE with a Llama decoder; its experts pack Llama's `gate_proj` / `up_proj` as `gate_up_proj`."""

    text_model_type = "llama"


MoIIEConfig.register_for_auto_class()
MoIIEModel.register_for_auto_class("AutoModel")
for _model_class in (MoIIEPhi3ForCausalLM, MoIIELlamaForCausalLM):
    _model_class.register_for_auto_class("AutoModelForCausalLM")
    _model_class.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MoIIECausalLMOutputWithPast",
    "MoIIEModel",
    "MoIIEModelOutputWithPast",
    "MoIIEForCausalLM",
    "MoIIELlamaForCausalLM",
    "MoIIEPhi3ForCausalLM",
    "MoIIEPreTrainedModel",
    "MoIIESparseBlock",
]

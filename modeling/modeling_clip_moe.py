# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""CLIP-MoE (Diversified Multiplet Upcycling): a CLIP whose transformer MLPs are top-k mixtures of experts.

Everything but the MLPs is transformers' CLIP (same modules, same weight names), so a CLIP-MoE
checkpoint differs from its dense base only in `*.mlp.router.weight` and the packed `*.mlp.experts.*`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPOutput,
    CLIPPreTrainedModel,
    CLIPTextEmbeddings,
    CLIPTextModelOutput,
    CLIPVisionEmbeddings,
    CLIPVisionModelOutput,
    _get_vector_norm,
    image_text_contrastive_loss,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_clip_moe import (
    LONG_CLIP_KEPT_POSITIONS,
    CLIPMoEConfig,
    CLIPMoETextConfig,
    CLIPMoEVisionConfig,
)
from .moe import MoEMLPExperts, MoESparseBlock, MoETopKRouter, load_balancing_loss, router_z_loss


logger = logging.get_logger(__name__)


def stretch_text_positions(position_embedding: torch.Tensor, keep: int = LONG_CLIP_KEPT_POSITIONS, factor: int = 4):
    """Long-CLIP's stretch of a `(77, d)` text position table to `(248, d)` (for keep=20, factor=4).

    Positions `< keep` are kept; each later position i (but the last) becomes `factor` positions interpolated
    between i and i + 1; the last position is extrapolated `factor` times along the last difference.
    """
    length = position_embedding.shape[0]
    head = position_embedding[:keep]
    steps = torch.arange(factor, dtype=position_embedding.dtype, device=position_embedding.device) / factor
    steps = steps[None, :, None]  # (1, factor, 1)
    left, right = position_embedding[keep : length - 1], position_embedding[keep + 1 : length]
    middle = (left[:, None] * (1 - steps) + right[:, None] * steps).reshape(-1, position_embedding.shape[1])
    last, step = position_embedding[-1], position_embedding[-1] - position_embedding[-2]
    tail = last[None] + steps[0] * step[None]
    return torch.cat([head, middle, tail])


@dataclass
class CLIPMoEModelOutputWithPooling(BaseModelOutputWithPooling):
    r"""
    router_logits (`tuple(torch.FloatTensor)`, *optional*, returned when `output_router_logits=True`):
        One `(batch_size * sequence_length, num_experts)` tensor of fp32 router logits per MoE block.
    """

    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CLIPMoETextModelOutput(CLIPTextModelOutput):
    r"""
    aux_loss (`torch.FloatTensor`, *optional*): Balance loss of this tower (unscaled), with router logits.
    router_logits (`tuple(torch.FloatTensor)`, *optional*): Router logits per MoE block.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CLIPMoEVisionModelOutput(CLIPVisionModelOutput):
    r"""
    aux_loss (`torch.FloatTensor`, *optional*): Balance loss of this tower (unscaled), with router logits.
    router_logits (`tuple(torch.FloatTensor)`, *optional*): Router logits per MoE block.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CLIPMoEOutput(CLIPOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*, returned when `return_loss=True`): The contrastive loss, plus
        `router_aux_loss_coef * aux_loss` (and the z-loss term) when router logits are output.
    aux_loss (`torch.FloatTensor`, *optional*): Image balance loss + text balance loss, unscaled.
    router_loss (`torch.FloatTensor`, *optional*): The weighted router terms of the training loss:
        `router_aux_loss_coef * aux_loss` plus `router_z_loss_coef * z-loss` when that is enabled.
    vision_router_logits / text_router_logits (`tuple(torch.FloatTensor)`, *optional*): Router logits per
        MoE block of each tower, returned when `output_router_logits=True`.
    """

    aux_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    vision_router_logits: tuple[torch.FloatTensor, ...] | None = None
    text_router_logits: tuple[torch.FloatTensor, ...] | None = None


class CLIPMoEEncoderLayer(CLIPEncoderLayer):
    """A CLIP encoder layer whose MLP is a sparse MoE block when `layer_idx` is one of the MoE layers."""

    def __init__(self, config: CLIPMoETextConfig | CLIPMoEVisionConfig, layer_idx: int):
        super().__init__(config)
        if layer_idx in config.moe_layer_indices():
            self.mlp = MoESparseBlock(config)


class CLIPMoEEncoder(nn.Module):
    def __init__(self, config: CLIPMoETextConfig | CLIPMoEVisionConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([CLIPMoEEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, attention_mask=None, **kwargs) -> BaseModelOutput:
        hidden_states = inputs_embeds
        for encoder_layer in self.layers:
            hidden_states = encoder_layer(hidden_states, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


class CLIPMoEPreTrainedModel(CLIPPreTrainedModel):
    config: CLIPMoEConfig
    config_class = CLIPMoEConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPMoEEncoderLayer", "CLIPVisionEmbeddings"]
    _can_record_outputs = {
        "hidden_states": CLIPMoEEncoderLayer,
        "attentions": CLIPAttention,
        "router_logits": OutputRecorder(MoETopKRouter, index=0),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for the experts decorator in this file's source; it lives in moe.py.
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, MoEMLPExperts):
            # Each expert initialised like transformers' CLIPMLP.
            config = module.config
            init.normal_(module.up_proj, std=(2 * config.hidden_size) ** -0.5 * factor)
            init.normal_(
                module.down_proj, std=config.hidden_size**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
            )
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, MoETopKRouter):
            init.normal_(module.weight, std=0.02 * factor)
        elif isinstance(module, CLIPMoEModel):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
        elif isinstance(module, CLIPMoEVisionModelWithProjection):
            init.normal_(module.visual_projection.weight, std=self.config.hidden_size**-0.5 * factor)
        elif isinstance(module, CLIPMoETextModelWithProjection):
            init.normal_(module.text_projection.weight, std=self.config.hidden_size**-0.5 * factor)


def _tower_aux_loss(config, router_logits, attention_mask=None):
    """Balance loss (unscaled) and the weighted extra loss terms of one tower, from its router logits."""
    if not router_logits:
        return None, 0
    aux_loss = load_balancing_loss(router_logits, config.num_local_experts, config.num_experts_per_tok, attention_mask)
    extra = config.router_aux_loss_coef * aux_loss
    if config.router_z_loss_coef > 0:
        extra = extra + config.router_z_loss_coef * router_z_loss(router_logits, attention_mask)
    return aux_loss, extra


class CLIPMoETextModel(CLIPMoEPreTrainedModel):
    """The CLIP-MoE text tower without projection (transformers' `CLIPTextModel` surface)."""

    config: CLIPMoETextConfig
    config_class = CLIPMoETextConfig
    input_modalities = ("text",)
    _input_embed_layer = "token_embedding"

    def __init__(self, config: CLIPMoETextConfig):
        super().__init__(config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPMoEEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value):
        self.embeddings.token_embedding = value

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CLIPMoEModelOutputWithPooling:
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, past_key_values=None
        )
        kwargs.pop("is_causal", None)
        encoder_outputs = self.encoder(
            inputs_embeds=hidden_states, attention_mask=causal_mask, is_causal=True, **kwargs
        )
        last_hidden_state = self.final_layer_norm(encoder_outputs.last_hidden_state)
        # Pool at the first EOS token (OpenAI checkpoints with eos_token_id == 2: at the highest token id).
        batch_index = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        token_ids = input_ids.to(dtype=torch.int, device=last_hidden_state.device)
        if self.eos_token_id == 2:
            eos_index = token_ids.argmax(dim=-1)
        else:
            eos_index = (token_ids == self.eos_token_id).int().argmax(dim=-1)
        return CLIPMoEModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=last_hidden_state[batch_index, eos_index]
        )


class CLIPMoEVisionModel(CLIPMoEPreTrainedModel):
    """The CLIP-MoE vision tower without projection (transformers' `CLIPVisionModel` surface)."""

    config: CLIPMoEVisionConfig
    config_class = CLIPMoEVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"

    def __init__(self, config: CLIPMoEVisionConfig):
        super().__init__(config)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPMoEEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool | None = False, **kwargs
    ) -> CLIPMoEModelOutputWithPooling:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        last_hidden_state = self.encoder(inputs_embeds=hidden_states, **kwargs).last_hidden_state
        pooled_output = self.post_layernorm(last_hidden_state[:, 0, :])
        return CLIPMoEModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled_output)


class CLIPMoEModel(CLIPMoEPreTrainedModel):
    """CLIP with mixture-of-experts MLPs in both towers (transformers' `CLIPModel` surface).

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("path/to/clip-moe", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/clip-moe")
    >>> inputs = processor(text=["a cat", "a dog"], images=image, return_tensors="pt", padding=True)
    >>> probs = model(**inputs).logits_per_image.softmax(dim=-1)
    ```"""

    def __init__(self, config: CLIPMoEConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = CLIPMoETextModel._from_config(config.text_config)
        self.vision_model = CLIPMoEVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
        self.post_init()

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CLIPMoEModelOutputWithPooling:
        """Text tower outputs with `pooler_output` projected into the joint space (as transformers' CLIP)."""
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> CLIPMoEModelOutputWithPooling:
        """Vision tower outputs with `pooler_output` projected into the joint space (as transformers' CLIP)."""
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> CLIPMoEOutput:
        r"""
        return_loss (`bool`, *optional*): Return the contrastive loss (plus the weighted router losses when
            router logits are output).
        output_router_logits (`bool`, *optional*): Return both towers' router logits and the aux loss;
            defaults to `config.output_router_logits`.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        text_outputs = self.get_text_features(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        image_embeds = vision_outputs.pooler_output
        text_embeds = text_outputs.pooler_output
        image_embeds = image_embeds / _get_vector_norm(image_embeds)
        text_embeds = text_embeds / _get_vector_norm(text_embeds)

        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device))
        logits_per_text = logits_per_text * self.logit_scale.exp().to(text_embeds.device)
        logits_per_image = logits_per_text.t()

        aux_loss = loss = router_loss = None
        if output_router_logits:
            vision_aux, vision_extra = _tower_aux_loss(self.config.vision_config, vision_outputs.router_logits)
            text_aux, text_extra = _tower_aux_loss(self.config.text_config, text_outputs.router_logits, attention_mask)
            present = [aux for aux in (vision_aux, text_aux) if aux is not None]
            aux_loss = sum(present) if present else None
            router_loss = vision_extra + text_extra
        if return_loss:
            loss = image_text_contrastive_loss(logits_per_text)
            if router_loss is not None:
                loss = loss + router_loss

        return CLIPMoEOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            aux_loss=aux_loss,
            router_loss=router_loss,
            vision_router_logits=vision_outputs.router_logits,
            text_router_logits=text_outputs.router_logits,
        )


class CLIPMoETextModelWithProjection(CLIPMoEPreTrainedModel):
    """CLIP-MoE text tower with its projection (transformers' `CLIPTextModelWithProjection` surface)."""

    config: CLIPMoETextConfig
    config_class = CLIPMoETextConfig
    base_model_prefix = "text_model"
    input_modalities = ("text",)

    def __init__(self, config: CLIPMoETextConfig):
        super().__init__(config)
        self.text_model = CLIPMoETextModel._from_config(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value):
        self.text_model.embeddings.token_embedding = value

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> CLIPMoETextModelOutput:
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        aux_loss, _ = _tower_aux_loss(self.config, outputs.router_logits, attention_mask)
        return CLIPMoETextModelOutput(
            text_embeds=self.text_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


class CLIPMoEVisionModelWithProjection(CLIPMoEPreTrainedModel):
    """CLIP-MoE vision tower with its projection (transformers' `CLIPVisionModelWithProjection` surface)."""

    config: CLIPMoEVisionConfig
    config_class = CLIPMoEVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: CLIPMoEVisionConfig):
        super().__init__(config)
        self.vision_model = CLIPMoEVisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    @can_return_tuple
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs) -> CLIPMoEVisionModelOutput:
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        aux_loss, _ = _tower_aux_loss(self.config, outputs.router_logits)
        return CLIPMoEVisionModelOutput(
            image_embeds=self.visual_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


# Saved folders carry this file, moe.py and the configuration, so `trust_remote_code=True` loads them anywhere.
CLIPMoEConfig.register_for_auto_class()
CLIPMoETextConfig.register_for_auto_class()
CLIPMoEVisionConfig.register_for_auto_class()
CLIPMoEModel.register_for_auto_class("AutoModel")
CLIPMoETextModel.register_for_auto_class("AutoModel")
CLIPMoEVisionModel.register_for_auto_class("AutoModel")

__all__ = [
    "CLIPMoEModel",
    "CLIPMoEOutput",
    "CLIPMoEPreTrainedModel",
    "CLIPMoETextModel",
    "CLIPMoETextModelWithProjection",
    "CLIPMoEVisionModel",
    "CLIPMoEVisionModelWithProjection",
    "stretch_text_positions",
]

# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""The CLIP scaffolding shared by the CLIP-family models whose encoders differ from CLIP's only in some MLPs
(CLIP-MoE, WEMoE): transformers' CLIP classes built around a family's own encoder, with the same modules under the
same names (so checkpoint keys stay CLIP's), without allocating the dense stack their constructors would build.

A family subclasses these and names its classes in the class attributes (`encoder_class`, `output_class`,
`vision_model_class`, ...); its own file keeps what differs (routers, losses, outputs). This file travels to the Hub
next to those families' model code (it imports only torch, transformers and sibling files).
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.clip.modeling_clip import (
    CLIPModel,
    CLIPPreTrainedModel,
    CLIPVisionEmbeddings,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.utils import can_return_tuple

from .model_card import KeepModelCardMixin
from .weight_init import InitializeAsTransformersMixin


class CLIPFamilyPreTrainedModel(KeepModelCardMixin, InitializeAsTransformersMixin, CLIPPreTrainedModel):
    """CLIP's `PreTrainedModel` with the model card kept, weights initialised as transformers initialises its own, and
    `logit_scale` initialised from the config (transformers' CLIP sets it in `__init__` only: a checkpoint without it
    would keep uninitialised memory)."""

    @torch.no_grad()
    def _init_weights(self, module):
        # CLIP's own modules (projections of the joint and *WithProjection models included, as the families
        # subclass transformers' classes) are initialised by CLIPPreTrainedModel.
        super()._init_weights(module)
        if isinstance(module, CLIPModel):
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)


def init_like_clip_mlp(config, factor: float, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> None:
    """Initialise an MLP's weights (packed experts' or a plain MLP's) as transformers' `CLIPMLP`."""
    init.normal_(fc1_weight, std=(2 * config.hidden_size) ** -0.5 * factor)
    init.normal_(fc2_weight, std=config.hidden_size**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor)
    init.zeros_(fc1_bias)
    init.zeros_(fc2_bias)


class CLIPFamilyVisionModel(CLIPVisionModel):
    """transformers' `CLIPVisionModel` over the family's `encoder_class`; its forward's output re-wrapped in the
    family's `output_class`, whose extra fields (router logits, routing weights) are then always present
    (`capture_outputs` adds their keys only when they are asked for)."""

    encoder_class: type[nn.Module]
    output_class: type

    def __init__(self, config):
        # Not `CLIPVisionModel.__init__`, which builds a dense encoder: the same modules under the same names.
        super(CLIPVisionModel, self).__init__(config)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = self.encoder_class(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool | None = False, **kwargs
    ):
        outputs = super().forward(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        return self.output_class(**outputs)


class CLIPFamilyVisionModelWithProjection(CLIPVisionModelWithProjection):
    """transformers' `CLIPVisionModelWithProjection` around the family's `vision_model_class`; the family writes the
    forward (transformers' builds its output from a fixed list of the tower's fields, which drops the family's)."""

    vision_model_class: type[nn.Module]

    def __init__(self, config):
        # Not `CLIPVisionModelWithProjection.__init__`, which builds a dense tower.
        super(CLIPVisionModelWithProjection, self).__init__(config)
        self.vision_model = self.vision_model_class._from_config(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()


class CLIPFamilyModel(CLIPModel):
    """transformers' `CLIPModel` (its `get_text_features`, `get_image_features` and contrastive forward) around the
    family's towers: `text_model_class._from_config(config.text_config, **text_model_kwargs)` and
    `vision_model_class._from_config(config.vision_config)`."""

    text_model_class: type[nn.Module]
    text_model_kwargs: dict = {}
    vision_model_class: type[nn.Module]

    def __init__(self, config):
        # Not `CLIPModel.__init__`, which builds dense towers: the same modules under the same names.
        super(CLIPModel, self).__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = self.text_model_class._from_config(config.text_config, **self.text_model_kwargs)
        self.vision_model = self.vision_model_class._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
        self.post_init()

    def clip_forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        return_loss=None,
        interpolate_pos_encoding=False,
        **kwargs,
    ):
        """transformers' `CLIPModel.forward` as a dict, for the family's forward to add its own fields to."""
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_loss=return_loss,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            **kwargs,
        )


__all__ = [
    "CLIPFamilyModel",
    "CLIPFamilyPreTrainedModel",
    "CLIPFamilyVisionModel",
    "CLIPFamilyVisionModelWithProjection",
    "init_like_clip_mlp",
]

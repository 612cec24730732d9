# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""CLIP-MoE (Diversified Multiplet Upcycling): a CLIP whose transformer MLPs are top-k mixtures of experts.

Every class subclasses its transformers CLIP counterpart and swaps the MLPs of the MoE blocks for
`MoESparseBlock`s; everything else is transformers' CLIP (same modules, same weight names, the same
forwards), so a CLIP-MoE checkpoint differs from its dense base only in `*.mlp.router.weight` and the packed
`*.mlp.experts.*`. What CLIP's outputs have no field for (router logits, balance and router losses) is added
on top.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPOutput,
    CLIPTextEmbeddings,
    CLIPTextModel,
    CLIPTextModelOutput,
    CLIPTextModelWithProjection,
    CLIPVisionModelOutput,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder

from .clip_towers import (
    CLIPFamilyModel,
    CLIPFamilyPreTrainedModel,
    CLIPFamilyVisionModel,
    CLIPFamilyVisionModelWithProjection,
    init_like_clip_mlp,
)
from .configuration_clip_moe import (
    LONG_CLIP_KEPT_POSITIONS,
    CLIPMoEConfig,
    CLIPMoETextConfig,
    CLIPMoEVisionConfig,
)
from .moe import (
    MoEMLPExperts,
    MoESparseBlock,
    MoETopKRouter,
    load_balancing_loss,
    note_packed_experts_stay_unquantized,
    router_z_loss,
)


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
        `router_loss` when router logits are output.
    aux_loss (`torch.FloatTensor`, *optional*): Image balance loss + text balance loss, unscaled.
    router_loss (`torch.FloatTensor`, *optional*): The weighted router terms of the training loss, each tower
        with its own coefficients: `vision_config.router_aux_loss_coef * image balance loss +
        text_config.router_aux_loss_coef * text balance loss`, plus `router_z_loss_coef * z-loss` per tower
        where that coefficient is above 0.
    vision_router_logits / text_router_logits (`tuple(torch.FloatTensor)`, *optional*): Router logits per
        MoE block of each tower, returned when `output_router_logits=True`.
    """

    aux_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    vision_router_logits: tuple[torch.FloatTensor, ...] | None = None
    text_router_logits: tuple[torch.FloatTensor, ...] | None = None


class CLIPMoEEncoderLayer(CLIPEncoderLayer):
    """transformers' CLIP encoder layer, its MLP swapped for a sparse MoE block when `layer_idx` is an MoE layer."""

    def __init__(self, config: CLIPMoETextConfig | CLIPMoEVisionConfig, layer_idx: int):
        super().__init__(config)
        if layer_idx in config.moe_layer_indices():
            self.mlp = MoESparseBlock(config)


class CLIPMoEEncoder(CLIPEncoder):
    """transformers' CLIP encoder (its forward) over `CLIPMoEEncoderLayer`s."""

    def __init__(self, config: CLIPMoETextConfig | CLIPMoEVisionConfig):
        # Not `CLIPEncoder.__init__`: it would allocate and initialise a whole dense stack only to drop it.
        nn.Module.__init__(self)
        self.config = config
        self.layers = nn.ModuleList([CLIPMoEEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False


class CLIPMoEPreTrainedModel(CLIPFamilyPreTrainedModel):
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

    def post_init(self):
        super().post_init()
        note_packed_experts_stay_unquantized(self)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # CLIP's own modules and logit_scale
        factor = self.config.initializer_factor
        if isinstance(module, MoEMLPExperts):
            # Each expert initialised like transformers' CLIPMLP.
            experts = (module.up_proj, module.up_proj_bias, module.down_proj, module.down_proj_bias)
            init_like_clip_mlp(module.config, factor, *experts)
        elif isinstance(module, MoETopKRouter):
            init.normal_(module.weight, std=0.02 * factor)


def _router_losses(config, router_logits, attention_mask=None):
    """Balance loss (unscaled) of one tower and its weighted router terms, with that tower's own coefficients."""
    if not router_logits:  # not requested, or a tower without MoE blocks
        return None, 0
    aux_loss = load_balancing_loss(router_logits, config.num_local_experts, config.num_experts_per_tok, attention_mask)
    weighted = config.router_aux_loss_coef * aux_loss
    if config.router_z_loss_coef > 0:
        weighted = weighted + config.router_z_loss_coef * router_z_loss(router_logits, attention_mask)
    return aux_loss, weighted


class CLIPMoETextModel(CLIPMoEPreTrainedModel, CLIPTextModel):
    """The CLIP-MoE text tower without projection: transformers' `CLIPTextModel` with MoE MLPs.

    `from_pretrained` also takes a folder holding a whole `CLIPMoEModel` and loads its text tower, as
    `CLIPTextModel` does for a `CLIPModel` checkpoint.
    """

    config: CLIPMoETextConfig
    config_class = CLIPMoETextConfig
    # Where this tower lives in the joint model: a joint checkpoint's `text_model.*` keys lose the prefix on load.
    base_model_prefix = "text_model"

    def __init__(self, config: CLIPMoETextConfig):
        # Not `CLIPTextModel.__init__`, which builds a dense encoder: the same modules under the same names
        # (the checkpoint keys), with the MoE encoder.
        super(CLIPTextModel, self).__init__(config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPMoEEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CLIPMoEModelOutputWithPooling:
        # transformers' forward. Its output class has no `router_logits` field (capture_outputs adds the key only
        # when the logits are asked for), so the result is re-wrapped in ours, where the field is always present.
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        return CLIPMoEModelOutputWithPooling(**outputs)


class CLIPMoEVisionModel(CLIPMoEPreTrainedModel, CLIPFamilyVisionModel):
    """The CLIP-MoE vision tower without projection: transformers' `CLIPVisionModel` with MoE MLPs.

    `from_pretrained` also takes a folder holding a whole `CLIPMoEModel` and loads its vision tower, as
    `CLIPVisionModel` does for a `CLIPModel` checkpoint.
    """

    config: CLIPMoEVisionConfig
    config_class = CLIPMoEVisionConfig
    # Where this tower lives in the joint model: a joint checkpoint's `vision_model.*` keys lose the prefix on load.
    base_model_prefix = "vision_model"
    encoder_class = CLIPMoEEncoder
    output_class = CLIPMoEModelOutputWithPooling


class CLIPMoEModel(CLIPMoEPreTrainedModel, CLIPFamilyModel):
    """CLIP with mixture-of-experts MLPs in both towers: transformers' `CLIPModel` (its `get_text_features`,
    `get_image_features` and contrastive forward) plus the router logits and losses.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("path/to/clip-moe", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/clip-moe", trust_remote_code=True)
    >>> inputs = processor(text=["a cat", "a dog"], images=image, return_tensors="pt", padding=True)
    >>> probs = model(**inputs).logits_per_image.softmax(dim=-1)
    ```"""

    text_model_class = CLIPMoETextModel
    vision_model_class = CLIPMoEVisionModel

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
        output_router_logits (`bool`, *optional*): Return both towers' router logits, the aux loss and the
            router loss; by default each tower follows its config's `output_router_logits`.
        """
        if output_router_logits is not None:
            kwargs["output_router_logits"] = output_router_logits
        outputs = self.clip_forward(
            input_ids, pixel_values, attention_mask, position_ids, return_loss, interpolate_pos_encoding, **kwargs
        )
        # CLIPOutput has no fields for the router outputs: they are added here from the towers' outputs.
        vision_logits = outputs.vision_model_output.router_logits
        text_logits = outputs.text_model_output.router_logits
        aux_loss = router_loss = None
        if vision_logits is not None or text_logits is not None:
            vision_aux, vision_weighted = _router_losses(self.config.vision_config, vision_logits)
            text_aux, text_weighted = _router_losses(self.config.text_config, text_logits, attention_mask)
            present = [aux for aux in (vision_aux, text_aux) if aux is not None]
            aux_loss = sum(present) if present else None
            router_loss = vision_weighted + text_weighted
            if outputs.loss is not None:
                outputs.loss = outputs.loss + router_loss
        return CLIPMoEOutput(
            **outputs,
            aux_loss=aux_loss,
            router_loss=router_loss,
            vision_router_logits=vision_logits,
            text_router_logits=text_logits,
        )


class CLIPMoETextModelWithProjection(CLIPMoEPreTrainedModel, CLIPTextModelWithProjection):
    """CLIP-MoE text tower with its projection (transformers' `CLIPTextModelWithProjection` with MoE MLPs).

    `from_pretrained` also takes a folder holding a whole `CLIPMoEModel` (text tower and `text_projection`).
    """

    config: CLIPMoETextConfig
    config_class = CLIPMoETextConfig

    def __init__(self, config: CLIPMoETextConfig):
        # Not `CLIPTextModelWithProjection.__init__`, which builds a dense tower.
        super(CLIPTextModelWithProjection, self).__init__(config)
        self.text_model = CLIPMoETextModel._from_config(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> CLIPMoETextModelOutput:
        # Our own forward: transformers' builds its output from a fixed list of the tower's fields, which drops
        # the router logits, and it has no balance loss.
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        aux_loss, _ = _router_losses(self.config, outputs.router_logits, attention_mask)
        return CLIPMoETextModelOutput(
            text_embeds=self.text_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


class CLIPMoEVisionModelWithProjection(CLIPMoEPreTrainedModel, CLIPFamilyVisionModelWithProjection):
    """CLIP-MoE vision tower with its projection (transformers' `CLIPVisionModelWithProjection` with MoE MLPs).

    `from_pretrained` also takes a folder holding a whole `CLIPMoEModel` (vision tower and `visual_projection`).
    """

    config: CLIPMoEVisionConfig
    config_class = CLIPMoEVisionConfig
    vision_model_class = CLIPMoEVisionModel

    @can_return_tuple
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs) -> CLIPMoEVisionModelOutput:
        # Our own forward, for the reason given in CLIPMoETextModelWithProjection.forward.
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        aux_loss, _ = _router_losses(self.config, outputs.router_logits)
        return CLIPMoEVisionModelOutput(
            image_embeds=self.visual_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


# Saved folders carry this file, the configuration and the sibling files they import (moe.py, clip_towers.py, ...),
# so `trust_remote_code=True` loads them anywhere.
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

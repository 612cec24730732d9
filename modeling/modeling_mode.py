# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoDE (mixture of data experts, seed 001): N CLIP data experts, each trained on the pairs of one coarse caption
cluster, ensembled per task with weights from how close the task's class names lie to the fine cluster centers."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import image_text_contrastive_loss
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging

from .configuration_mode import CLUSTERING_POOLINGS, MoDEConfig
from .model_card import KeepModelCardMixin

# Imported so that a saved folder carries pipeline_mode.py (transformers copies a model file's relative imports), which
# the config's `custom_pipelines` names for pipeline("zero-shot-image-classification", trust_remote_code=True).
from .pipeline_mode import MoDEZeroShotImageClassificationPipeline  # noqa: F401
from .weight_init import InitializeAsTransformersMixin


logger = logging.get_logger(__name__)


def clustering_text_embeddings(
    encoder: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pooling: str = "pooler",
) -> torch.Tensor:
    """The clustering embeddings `(batch, dim)` of tokenised texts, float32 and NOT normalised (MoDE saves them raw
    and L2-normalises at clustering / assignment time).

    `encoder` is a transformers text encoder (e.g. `BertModel`) for the poolings "pooler", "cls" and "mean", and a
    `CLIPModel` or `CLIPTextModelWithProjection` for "clip".
    """
    if pooling not in CLUSTERING_POOLINGS:
        raise ValueError(f"Unknown clustering pooling {pooling!r}; expected one of {CLUSTERING_POOLINGS}.")
    if pooling == "clip":
        if isinstance(encoder, CLIPModel):
            features = encoder.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        elif isinstance(encoder, CLIPTextModelWithProjection):
            features = encoder(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        else:
            raise TypeError(
                "Clustering pooling 'clip' needs a CLIPModel or CLIPTextModelWithProjection, "
                f"got {type(encoder).__name__}."
            )
        return features.float()

    outputs = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    if pooling == "pooler":
        if getattr(outputs, "pooler_output", None) is None:
            raise ValueError(
                f"Clustering pooling 'pooler' needs an encoder with a pooler; {type(encoder).__name__} returned none "
                "(use pooling 'cls' or 'mean')."
            )
        return outputs.pooler_output.float()
    hidden = outputs.last_hidden_state.float()  # (batch, seq, dim)
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def released_task_weights(distances: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The expert weights `(num_experts,)` of the official MoDE code from each class's distance to its nearest fine
    center (`distances`, `(num_classes,)`) and that center's expert (`experts`, `(num_classes,)` long)."""
    num_classes = distances.shape[0]
    # The constants are the released code's (MetaCLIP mode/post_report_ensemble.py), see METHODS.md section 2.
    add = math.exp(0.5 - math.sqrt(num_classes)) if num_classes < 10 else 0.0
    mul = 5.0 * math.log10(max(10, num_classes - 200))
    per_class = torch.exp((add - distances) * mul)  # (num_classes,)
    scores = distances.new_zeros(num_experts).index_add_(0, experts, per_class)  # (num_experts,)
    return torch.softmax(scores / 8.0, dim=0)


def paper_task_weights(
    embeddings: torch.Tensor, fine_centers: torch.Tensor, fine_to_coarse: torch.Tensor, num_experts: int, lam: float
) -> torch.Tensor:
    """The expert weights `(num_experts,)` of the paper: A_ls = exp(-||e_l - e_s||^2 / lambda) between class l and
    fine center s; the row-wise max filter keeps, in each row l, only its largest entry (the nearest fine center) and
    zeroes the rest; then p(c|T) is proportional to exp(sum over l and s in S_c of A_ls), S_c the fine centers of
    expert c, i.e. a softmax over the experts of the summed kept affinities."""
    affinity = torch.exp(-torch.cdist(embeddings, fine_centers).square() / lam)  # (num_classes, m)
    kept, nearest = affinity.max(dim=1)  # (num_classes,)
    scores = embeddings.new_zeros(num_experts).index_add_(0, fine_to_coarse[nearest], kept)
    return torch.softmax(scores, dim=0)


def stack_expert_outputs(outputs: list[BaseModelOutputWithPooling]) -> BaseModelOutputWithPooling:
    """The experts' tower outputs as one `BaseModelOutputWithPooling` whose every tensor has a leading experts
    dimension (`hidden_states` / `attentions`: one stacked tensor per layer). The experts share one architecture,
    so their shapes agree; their feature spaces do not, which is why MoDE ensembles similarities, not features."""

    def stack(values):
        if values[0] is None:
            return None
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values)
        return tuple(stack(list(layer)) for layer in zip(*values))

    return BaseModelOutputWithPooling(
        **{
            key: stack([getattr(out, key) for out in outputs])
            for key in BaseModelOutputWithPooling.__dataclass_fields__
        }
    )


@dataclass
class MoDEOutput(ModelOutput):
    r"""Output of [`MoDEModel`]: CLIP's logits, ensembled over the data experts, and what they were made of.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True`):
            CLIP's contrastive loss on the ensembled logits.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            s * sum_k w_k * cos_k: the experts' cosine similarities weighted by the task weights (per text with
            `per_query_weights`), times the ensemble's logit scale s = `logit_scale.exp()`.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        expert_logits_per_image (`torch.FloatTensor` of shape `(num_experts, image_batch_size, text_batch_size)`):
            Each expert's own CLIP logits (its logit scale times the cosine similarities).
        task_weights (`torch.FloatTensor` of shape `(num_experts,)`, or `(text_batch_size, num_experts)` with
            `per_query_weights`): The expert weights used.
        text_embeds (`torch.FloatTensor` of shape `(num_experts, text_batch_size, projection_dim)`):
            Each expert's normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(num_experts, image_batch_size, projection_dim)`):
            Each expert's normalised image embeddings.
        text_model_output (`BaseModelOutputWithPooling`):
            The experts' text tower outputs, each tensor with a leading experts dimension (`stack_expert_outputs`);
            `hidden_states` / `attentions` with `output_hidden_states` / `output_attentions`.
        vision_model_output (`BaseModelOutputWithPooling`):
            The experts' vision tower outputs, as `text_model_output`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    expert_logits_per_image: torch.FloatTensor | None = None
    task_weights: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        # As CLIPOutput: the nested tower outputs become tuples too.
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


def _set_nested_dtype(config) -> None:
    """Give every nested sub-config the dtype of `config`. `from_pretrained(dtype=...)` sets it one level down only
    (on `expert_config`), and CLIPModel builds its towers from `text_config` / `vision_config` with THEIR dtype, so
    the experts' towers stayed float32 under `dtype=torch.bfloat16`."""
    for key in getattr(config, "sub_configs", {}):
        sub_config = getattr(config, key, None)
        if sub_config is not None:
            sub_config.dtype = config.dtype
            _set_nested_dtype(sub_config)


class MoDEPreTrainedModel(KeepModelCardMixin, InitializeAsTransformersMixin, PreTrainedModel):
    # InitializeAsTransformersMixin: CLIP's attention and MLP blocks own no parameters and initialise their Linear
    # children from the parent; transformers' custom-code heuristic skipped them, so the experts' missing weights came
    # back with the generic std instead of CLIP's.
    config_class = MoDEConfig
    base_model_prefix = "mode"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # The experts' (CLIPModel's): post_init collects only direct children's, and the experts sit in a ModuleList.
    # The clustering encoder, a direct child, contributes its own.
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # The fine centers place class names by euclidean distance; bfloat16 would move which center is nearest.
    _keep_in_fp32_modules_strict = ["fine_centers"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        # MoDE's experts are whole CLIP models, not packed MoE experts, so no experts implementation applies; accept
        # the argument (it is valid for every family that has packed experts) and say that it changes nothing.
        if experts_implementation in (None, "eager"):  # what MoDE's plain modules are anyway
            return experts_implementation
        if experts_implementation != "grouped_mm":  # grouped_mm needs packed experts to dispatch to; others: checked
            super()._check_and_adjust_experts_implementation(experts_implementation)
        logger.warning_once(
            f"experts_implementation={experts_implementation!r} is ignored: MoDE has no packed experts (each data "
            "expert is a whole CLIPModel)."
        )
        return experts_implementation

    def _init_weights(self, module):
        # The experts' and the clustering encoder's own weights go through their classes' `_init_weights`
        # (`initialize_weights` dispatches sub-models to theirs).
        if isinstance(module, MoDEModel):
            init.zeros_(module.fine_centers)
            init.zeros_(module.fine_to_coarse)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            # CLIPModel's `_init_weights` leaves its `logit_scale` to its constructor, so one missing from a
            # checkpoint would stay uninitialised memory; set it as a fresh expert has it.
            for expert in module.experts:
                init.constant_(expert.logit_scale, expert.config.logit_scale_init_value)


class MoDEModel(MoDEPreTrainedModel):
    r"""MoDE: `num_experts` CLIP data experts (`experts`, each a `CLIPModel`), the fine cluster centers of the caption
    clustering (`fine_centers`, `(m, D)`, with their experts `fine_to_coarse`, `(m,)`) and the clustering text encoder
    (`clustering_encoder`), ensembled per task: the task's class names (the texts given to `forward`, one per class,
    e.g. the zero-shot pipeline's candidate labels) are embedded with the clustering encoder, weighed against the fine
    centers (`task_weights`), and the logits are s * sum_k w_k * cos_k over the experts' cosine similarities
    cos_k, as the released code ensembles them, times one CLIP-like logit scale s (`logit_scale`, learnable like
    CLIP's; the build sets it to the experts' mean scale). With one expert, this is that CLIP.

    The clustering tokens come as `clustering_input_ids` / `clustering_attention_mask` (the folder's `MoDETokenizer`
    adds them to its output); with the "clip" pooling of the experts' tokenizer, `input_ids` themselves are used.
    """

    def __init__(self, config: MoDEConfig):
        super().__init__(config)
        if config.dtype is not None:
            _set_nested_dtype(config)
        # The setter passes a requested experts implementation down to the experts, and CLIPModel refuses one.
        for sub_config in (config.expert_config, config.clustering_encoder_config):
            if sub_config is not None:
                sub_config._experts_implementation = None
        self.experts = nn.ModuleList([CLIPModel(config.expert_config) for _ in range(config.num_experts)])
        encoder_config = config.clustering_encoder_config
        if encoder_config is None:
            self.clustering_encoder = None
        elif isinstance(encoder_config, CLIPTextConfig):
            # AutoModel would give CLIPTextModel, without the projection CLIP's text features go through.
            self.clustering_encoder = CLIPTextModelWithProjection(encoder_config)
        else:
            self.clustering_encoder = AutoModel.from_config(encoder_config)
        dim = config.clustering_dim
        self.register_buffer("fine_centers", torch.zeros(config.num_fine_clusters, dim, dtype=torch.float32))
        self.register_buffer("fine_to_coarse", torch.zeros(config.num_fine_clusters, dtype=torch.long))
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def _with_output_flags(self, kwargs: dict) -> dict:
        """`kwargs` with MoDE's own `output_hidden_states` / `output_attentions` config flags where the call sets none:
        the experts' towers read their own (nested) configs, which a flag set on this config does not reach."""
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag) is None and getattr(self.config, flag, False):
                kwargs = {**kwargs, flag: True}
        return kwargs

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        expert: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""The experts' text tower outputs, as `CLIPModel.get_text_features` returns them: `pooler_output` holds the
        projected (unnormalised) text features. Every tensor has a leading experts dimension (`pooler_output`:
        `(num_experts, batch, projection_dim)`), since the experts' feature spaces differ and MoDE ensembles their
        cosine similarities with task weights (see `forward`), never their features. With `expert=k`: exactly expert
        k's `get_text_features` (`pooler_output` `(batch, projection_dim)`).
        """
        kwargs = self._with_output_flags(kwargs)
        if expert is not None:
            return self.experts[expert].get_text_features(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                return_dict=True,
                **kwargs,
            )
        return stack_expert_outputs(
            [
                clip.get_text_features(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    return_dict=True,
                    **kwargs,
                )
                for clip in self.experts
            ]
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        expert: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""The experts' vision tower outputs, as `CLIPModel.get_image_features` returns them, with a leading experts
        dimension (`pooler_output`: `(num_experts, batch, projection_dim)`, projected, unnormalised); with
        `expert=k`: exactly expert k's (see `get_text_features`).
        """
        kwargs = self._with_output_flags(kwargs)
        if expert is not None:
            return self.experts[expert].get_image_features(
                pixel_values=pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                return_dict=True,
                **kwargs,
            )
        return stack_expert_outputs(
            [
                clip.get_image_features(
                    pixel_values=pixel_values,
                    interpolate_pos_encoding=interpolate_pos_encoding,
                    return_dict=True,
                    **kwargs,
                )
                for clip in self.experts
            ]
        )

    def clustering_embeddings(
        self, input_ids=None, attention_mask=None, clustering_input_ids=None, clustering_attention_mask=None
    ) -> torch.Tensor:
        """The unnormalised clustering embeddings `(batch, D)` of texts: of `clustering_input_ids` with the clustering
        encoder, or, with the "clip" pooling and no clustering tokens, of the experts' `input_ids`."""
        pooling = self.config.clustering_pooling
        if clustering_input_ids is None:
            if pooling != "clip":
                raise ValueError(
                    f"This MoDE model embeds class names with its clustering encoder ({pooling!r} pooling of "
                    f"'{self.config.clustering_encoder_name_or_path}'), which needs `clustering_input_ids`: tokenize "
                    "with the model folder's tokenizer (AutoTokenizer.from_pretrained(folder, "
                    "trust_remote_code=True)), or pass `task_weights`."
                )
            clustering_input_ids, clustering_attention_mask = input_ids, attention_mask
        encoder = self.clustering_encoder if self.clustering_encoder is not None else self.experts[0]
        return clustering_text_embeddings(encoder, clustering_input_ids, clustering_attention_mask, pooling)

    def task_weights(self, class_embeddings: torch.Tensor) -> torch.Tensor:
        """The expert weights `(num_experts,)` of a task from its class names' clustering embeddings: `(num_classes, D)`
        or `(num_classes, num_templates, D)` (each template's embedding normalised, averaged over the templates).
        Each class embedding is L2-normalised, then compared (euclidean) with the fine centers as stored; the formula
        is `config.ensemble_formula` ("released" or "paper", see `released_task_weights` / `paper_task_weights`)."""
        embeddings = class_embeddings.float()
        if embeddings.dim() == 3:
            embeddings = F.normalize(embeddings, dim=-1).mean(dim=1)
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.fine_centers.shape[-1]:
            raise ValueError(
                f"class_embeddings must be (num_classes, {self.fine_centers.shape[-1]}) or (num_classes, "
                f"num_templates, {self.fine_centers.shape[-1]}), got {tuple(class_embeddings.shape)}."
            )
        embeddings = F.normalize(embeddings, dim=-1)
        centers = self.fine_centers.float()
        num_experts = self.config.num_experts
        if self.config.ensemble_formula == "paper":
            return paper_task_weights(embeddings, centers, self.fine_to_coarse, num_experts, self.config.paper_lambda)
        distances, nearest = torch.cdist(embeddings, centers).min(dim=1)  # (num_classes,)
        return released_task_weights(distances, self.fine_to_coarse[nearest], num_experts)

    def per_query_task_weights(self, query_embeddings: torch.Tensor) -> torch.Tensor:
        """Weights `(num_queries, num_experts)` for text->image retrieval: each query text is its own one-class task."""
        return torch.stack([self.task_weights(query[None]) for query in query_embeddings])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        clustering_input_ids: torch.LongTensor | None = None,
        clustering_attention_mask: torch.Tensor | None = None,
        task_weights: torch.Tensor | None = None,
        per_query_weights: bool = False,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoDEOutput:
        r"""
        clustering_input_ids (`torch.LongTensor` of shape `(text_batch_size, clustering_sequence_length)`, *optional*):
            The texts (one per class of the task) tokenised for the clustering encoder; `MoDETokenizer` returns them.
        clustering_attention_mask (`torch.Tensor`, *optional*): Their attention mask.
        task_weights (`torch.Tensor` of shape `(num_experts,)` or `(text_batch_size, num_experts)`, *optional*):
            Expert weights to use instead of computing them from the texts (e.g. from `task_weights(...)` of
            template-averaged class embeddings, or one-hot to run a single expert).
        per_query_weights (`bool`, defaults to `False`): Text->image retrieval: weights from each text alone
            (`(text_batch_size, num_experts)`), so every text column is ensembled with its own weights. Off: the
            texts are the classes of ONE task (zero-shot classification, image->text retrieval over a corpus).
        return_loss (`bool`, *optional*): Return CLIP's contrastive loss on the ensembled logits.

        The weights of one task depend on ALL its texts (the classes together), so, unlike CLIP, a text's logits
        change with the other texts of the batch (except with `per_query_weights` or given `task_weights`).
        """
        kwargs = self._with_output_flags(kwargs)
        if input_ids is None or pixel_values is None:
            raise ValueError("MoDEModel.forward needs both input_ids (the class texts) and pixel_values.")
        outputs = [
            clip(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                interpolate_pos_encoding=interpolate_pos_encoding,
                return_dict=True,
                **kwargs,
            )
            for clip in self.experts
        ]
        expert_logits = torch.stack([out.logits_per_image for out in outputs])  # (E, B_img, B_txt)
        if task_weights is None:
            embeddings = self.clustering_embeddings(
                input_ids, attention_mask, clustering_input_ids, clustering_attention_mask
            )
            if per_query_weights:
                task_weights = self.per_query_task_weights(embeddings)
            else:
                task_weights = self.task_weights(embeddings)
        text_embeds = torch.stack([out.text_embeds for out in outputs])  # (E, B_txt, P), normalised
        image_embeds = torch.stack([out.image_embeds for out in outputs])  # (E, B_img, P), normalised
        # One matmul per expert, as CLIPModel computes it, so that a single expert's logits are bitwise its own.
        cosine_per_text = torch.stack([torch.matmul(t, i.t()) for t, i in zip(text_embeds, image_embeds)])
        weights = task_weights.to(device=cosine_per_text.device, dtype=cosine_per_text.dtype)
        if weights.dim() == 1:
            weights = weights[:, None, None]  # one task: every text the same weights
        else:
            weights = weights.t()[:, :, None]  # (E, B_txt, 1): per query text
        logits_per_text = (weights * cosine_per_text).sum(dim=0) * self.logit_scale.exp()
        loss = image_text_contrastive_loss(logits_per_text) if return_loss else None
        return MoDEOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            expert_logits_per_image=expert_logits,
            task_weights=task_weights,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=stack_expert_outputs([out.text_model_output for out in outputs]),
            vision_model_output=stack_expert_outputs([out.vision_model_output for out in outputs]),
        )


MoDEConfig.register_for_auto_class()
MoDEModel.register_for_auto_class("AutoModel")
MoDEModel.register_for_auto_class("AutoModelForZeroShotImageClassification")


__all__ = [
    "CLUSTERING_POOLINGS",
    "MoDEModel",
    "MoDEOutput",
    "MoDEPreTrainedModel",
    "clustering_text_embeddings",
    "paper_task_weights",
    "released_task_weights",
    "stack_expert_outputs",
]

# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoDE configuration: the CLIP config shared by the data experts, the clustering text encoder's config and the
task-adaptive ensembling fields."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

ENSEMBLE_FORMULAS = ("released", "paper")
# How a clustering text encoder turns tokens into one caption embedding (`modeling_mode.clustering_text_embeddings`).
# "pooler": BERT's pooler output, which supervised SimCSE (the paper's encoder) was trained through; "cls" / "mean":
# the last hidden state's first token / attention-masked mean; "clip": CLIP's projected text features.
CLUSTERING_POOLINGS = ("pooler", "cls", "mean", "clip")


@strict
class MoDEConfig(PreTrainedConfig):
    r"""Configuration of [`MoDEModel`]: `num_experts` CLIP data experts of one architecture, the fine cluster
    centers of the caption clustering, and the clustering text encoder that places a task's class names among them.

    Args:
        expert_config (`dict` or `CLIPConfig`, *optional*): The architecture of every expert (each keeps its own
            weights and its own `logit_scale`, so each expert's logits are exactly that CLIP's).
        num_experts (`int`, defaults to 2): n, the number of data experts = coarse clusters.
        num_fine_clusters (`int`, defaults to 1024): m, the number of fine cluster centers.
        clustering_encoder_config (`dict` or `PreTrainedConfig`, *optional*): The clustering text encoder, any
            `AutoModel` text encoder (paper: supervised SimCSE, a `BertConfig`); a `CLIPTextConfig` means a CLIP text
            tower with its projection (`CLIPTextModelWithProjection`). `None`: no separate encoder; the class names
            are embedded with the text tower of expert 0 (pooling "clip"), which is exact only when the clusters were
            built with that expert's text tower.
        clustering_encoder_name_or_path (`str`, *optional*): Where the clustering encoder came from (provenance).
        clustering_pooling (`str`, *optional*): "pooler", "cls", "mean" or "clip" (see
            `modeling_mode.clustering_text_embeddings`); default "pooler" with a clustering encoder, else "clip".
        clustering_max_length (`int`, defaults to 77): Token limit of the clustering tokenizer.
        ensemble_formula (`str`, defaults to `"released"`): "released" (the official code's weights) or "paper".
        paper_lambda (`float`, defaults to 0.2): lambda of the paper's formula.
        logit_scale_init_value (`float`, defaults to 2.6592): Initial log of the ONE logit scale of the ensemble
            (as in CLIP): the released code ensembles the experts' cosine similarities; the scale turns the sum
            into CLIP-like logits (it changes no argmax). `build_mode` sets it to the log of the experts' mean scale.
        task_templates (`list[str]`, *optional*): The prompt templates (one `{}` each) every class name is averaged
            over for the task weights when a caller gives class names without templates: the zero-shot pipeline
            (`pipeline_mode.py`; its `task_templates` argument overrides them). `build_mode` writes the 8 templates
            `hf-moe eval` uses by default; `None`: the pipeline's `hypothesis_template` alone.
    """

    model_type = "mode"
    sub_configs_defaults = {
        "expert_config": SubConfigSpec(config_class=CLIPConfig),
        "clustering_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    expert_config: dict | CLIPConfig | None = None
    num_experts: int = 2
    num_fine_clusters: int = 1024
    clustering_encoder_config: dict | PreTrainedConfig | None = None
    clustering_encoder_name_or_path: str | None = None
    clustering_pooling: str | None = None
    clustering_max_length: int = 77
    ensemble_formula: str = "released"
    paper_lambda: float | int = 0.2
    logit_scale_init_value: float | int = 2.6592
    task_templates: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.clustering_pooling is None:
            self.clustering_pooling = "clip" if self.clustering_encoder_config is None else "pooler"
        if not getattr(self, "auto_map", None):
            # Saved folders then load through every Auto class users reach for, pipelines included.
            self.auto_map = {
                "AutoConfig": "configuration_mode.MoDEConfig",
                "AutoModel": "modeling_mode.MoDEModel",
                "AutoModelForZeroShotImageClassification": "modeling_mode.MoDEModel",
            }
        if not getattr(self, "custom_pipelines", None):
            # pipeline("zero-shot-image-classification", trust_remote_code=True) then computes the task weights as
            # the released code does (class names averaged over templates); the file travels with modeling_mode.py.
            self.custom_pipelines = {
                "zero-shot-image-classification": {
                    "impl": "pipeline_mode.MoDEZeroShotImageClassificationPipeline",
                    "pt": ["AutoModelForZeroShotImageClassification"],
                    "tf": [],
                    "type": "multimodal",
                }
            }

    def validate_mode(self):
        """Part of `@strict` validation: refuse inconsistent MoDE fields, naming the field."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}.")
        if self.num_fine_clusters < 1:
            raise ValueError(f"num_fine_clusters must be at least 1, got {self.num_fine_clusters}.")
        if self.clustering_pooling not in CLUSTERING_POOLINGS:
            raise ValueError(
                f"clustering_pooling must be one of {CLUSTERING_POOLINGS}, got {self.clustering_pooling!r}."
            )
        if self.clustering_encoder_config is None and self.clustering_pooling != "clip":
            raise ValueError(
                f"clustering_pooling={self.clustering_pooling!r} needs a clustering_encoder_config; without one the "
                "class names are embedded with expert 0's CLIP text tower (clustering_pooling='clip')."
            )
        if self.ensemble_formula not in ENSEMBLE_FORMULAS:
            raise ValueError(f"ensemble_formula must be one of {ENSEMBLE_FORMULAS}, got {self.ensemble_formula!r}.")
        if self.paper_lambda <= 0:
            raise ValueError(f"paper_lambda must be positive, got {self.paper_lambda}.")
        if self.task_templates is not None and (
            not self.task_templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in self.task_templates)
        ):
            raise ValueError(
                "task_templates must be a non-empty list of templates with '{}' exactly once, "
                f"got {self.task_templates!r}."
            )

    @property
    def clustering_dim(self) -> int:
        """The dimension of the clustering embeddings (and of the fine centers)."""
        encoder = self.clustering_encoder_config
        if encoder is None:
            return self.expert_config.projection_dim
        if encoder.model_type == "clip_text_model":
            return encoder.projection_dim
        return encoder.hidden_size


__all__ = ["CLUSTERING_POOLINGS", "ENSEMBLE_FORMULAS", "MoDEConfig"]

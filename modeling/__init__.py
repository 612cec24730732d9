# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""The model code of hf-moe. Each family is one `configuration_*.py` + `modeling_*.py` pair; the pairs share
`moe.py` (routers, packed experts, sparse block, balance losses), `clip_towers.py` (CLIP-MoE's and WEMoE's CLIP
scaffolding), `weight_init.py` and `model_card.py`. Saved models carry their pair and the shared files it imports
(transformers copies a model file's relative imports), so they load with `trust_remote_code=True` where hf_moe is
absent.

Importing this package registers every family with transformers' Auto classes, so that in a process that
imported it `AutoModel.from_pretrained(folder)` works without `trust_remote_code`. (This file is the
package's, not the Hub's: only the flat `configuration_*` / `modeling_*` files and the shared files they import travel.)
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)

from . import clip_towers
from .configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from .configuration_mode import MoDEConfig
from .configuration_moiie import MoIIEConfig
from .configuration_we_moe import WEMoEConfig, WEMoEVisionConfig
from .modeling_clip_moe import (
    CLIPMoEModel,
    CLIPMoEOutput,
    CLIPMoEPreTrainedModel,
    CLIPMoETextModel,
    CLIPMoETextModelWithProjection,
    CLIPMoEVisionModel,
    CLIPMoEVisionModelWithProjection,
    stretch_text_positions,
)
from .modeling_mode import (
    MoDEModel,
    MoDEOutput,
    MoDEPreTrainedModel,
    clustering_text_embeddings,
    paper_task_weights,
    released_task_weights,
)
from .modeling_moiie import (
    MoIIECausalLMOutputWithPast,
    MoIIEForCausalLM,
    MoIIELlamaForCausalLM,
    MoIIEModel,
    MoIIEPhi3ForCausalLM,
    MoIIEPreTrainedModel,
)
from .modeling_we_moe import (
    PerSampleMergedLinear,
    WEMoECLIPModel,
    WEMoECLIPVisionModel,
    WEMoECLIPVisionModelWithProjection,
    WEMoEMLP,
    WEMoEOutput,
    WEMoEPreTrainedModel,
    WEMoERouter,
    per_sample_merged_linear,
)
from .moe import MoEMLPExperts, MoESparseBlock, MoETopKRouter, expert_load, load_balancing_loss, router_z_loss
from .processing_moiie import MoIIEProcessor, num_image_tokens_of
from .tokenization_mode import MoDETokenizer


# (config, Auto class -> model class) for in-process use; saved folders also carry an `auto_map`.
AUTO_CLASSES = [
    (CLIPMoEConfig, {AutoModel: CLIPMoEModel, AutoModelForZeroShotImageClassification: CLIPMoEModel}),
    (CLIPMoETextConfig, {AutoModel: CLIPMoETextModel}),
    (CLIPMoEVisionConfig, {AutoModel: CLIPMoEVisionModel}),
    (WEMoEConfig, {AutoModel: WEMoECLIPModel, AutoModelForZeroShotImageClassification: WEMoECLIPModel}),
    (WEMoEVisionConfig, {AutoModel: WEMoECLIPVisionModel}),
    (MoDEConfig, {AutoModel: MoDEModel, AutoModelForZeroShotImageClassification: MoDEModel}),
    # MoIIEForCausalLM.from_pretrained / _from_config return MoIIEPhi3ForCausalLM or MoIIELlamaForCausalLM.
    (
        MoIIEConfig,
        {AutoModel: MoIIEModel, AutoModelForCausalLM: MoIIEForCausalLM, AutoModelForImageTextToText: MoIIEForCausalLM},
    ),
]


def register_auto_classes() -> None:
    """Register every hf-moe family with AutoConfig and its Auto model classes (idempotent)."""
    for config_class, models in AUTO_CLASSES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)

    AutoProcessor.register(MoIIEConfig, MoIIEProcessor, exist_ok=True)
    AutoTokenizer.register(MoDEConfig, MoDETokenizer, exist_ok=True)


register_auto_classes()

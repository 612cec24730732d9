# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""The model code of hf-moe. Each family is one `configuration_*.py` + `modeling_*.py` pair sharing `moe.py`;
saved models carry exactly those files, so they load with `trust_remote_code=True` where hf_moe is absent."""

from .configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
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
from .moe import MoEMLPExperts, MoESparseBlock, MoETopKRouter, expert_load, load_balancing_loss, router_z_loss

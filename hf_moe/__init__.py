# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""hf-moe: mixture-of-experts models built from dense checkpoints, native to the Hugging Face stack.

Importing the package registers every model family with transformers' Auto classes, so
`AutoModel.from_pretrained(folder)` works in process without `trust_remote_code`.
"""

from .modeling import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextConfig,
    CLIPMoETextModel,
    CLIPMoETextModelWithProjection,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
    CLIPMoEVisionModelWithProjection,
)
from .registration import register_auto_classes


__version__ = "0.1.0"

register_auto_classes()

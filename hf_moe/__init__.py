# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""hf-moe: mixture-of-experts models built from dense checkpoints, native to the Hugging Face stack.

Importing `hf_moe` is cheap (no torch, no transformers), so `hf-moe --help` answers at once. The model classes
load on first use, as in transformers: `hf_moe.CLIPMoEModel`, or `import hf_moe.modeling`, imports the model
code and registers every family with transformers' Auto classes, after which
`AutoModel.from_pretrained(folder)` works in process without `trust_remote_code`.

Layout: shared modules (`data`, `losses`, `training`, `clustering`, `evaluation`, `hub`, `fileio`, `cli`) and
one subpackage per family (`clip_moe`, `we_moe`); families import shared modules, never each other.
"""

import importlib


__version__ = "0.1.0"

_MODELING_EXPORTS = (
    "CLIPMoEConfig",
    "CLIPMoEModel",
    "CLIPMoETextConfig",
    "CLIPMoETextModel",
    "CLIPMoETextModelWithProjection",
    "CLIPMoEVisionConfig",
    "CLIPMoEVisionModel",
    "CLIPMoEVisionModelWithProjection",
    "WEMoECLIPModel",
    "WEMoECLIPVisionModel",
    "WEMoECLIPVisionModelWithProjection",
    "WEMoEConfig",
    "WEMoEVisionConfig",
)
__all__ = ["__version__", *_MODELING_EXPORTS]


def __getattr__(name: str):
    if name in _MODELING_EXPORTS:
        return getattr(importlib.import_module(".modeling", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

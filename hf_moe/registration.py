"""Registration of hf-moe's configs and models with transformers' Auto classes (in-process use)."""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .modeling import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextConfig,
    CLIPMoETextModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
)


# (config, Auto classes -> model class). Folders saved by hf-moe also carry an `auto_map` for remote code.
_REGISTRY = [
    (CLIPMoEConfig, {AutoModel: CLIPMoEModel, AutoModelForZeroShotImageClassification: CLIPMoEModel}),
    (CLIPMoETextConfig, {AutoModel: CLIPMoETextModel}),
    (CLIPMoEVisionConfig, {AutoModel: CLIPMoEVisionModel}),
]


def register_auto_classes() -> None:
    """Register every hf-moe family with AutoConfig and its Auto model classes (idempotent)."""
    for config_class, models in _REGISTRY:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)

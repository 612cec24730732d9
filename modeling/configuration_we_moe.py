# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""WEMoE / E-WEMoE configuration: transformers' CLIP configs plus the weight-ensembling MoE fields.

The WEMoE fields live in the vision tower (`WEMoEVisionConfig`); the joint `WEMoEConfig` keeps a plain CLIP
text config, since WEMoE merges vision-only fine-tunes and takes the text tower from the pretrained CLIP.
"""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from .moe import resolve_moe_layers


TASK_VECTOR_FORMATS = ("dense", "pruned", "svd")

# Names of the WEMoE fields of `WEMoEVisionConfig`; the joint config exposes each as a view of its vision tower.
WE_MOE_FIELD_NAMES = (
    "num_tasks",
    "task_names",
    "init_lambda",
    "router_depth",
    "shared_router",
    "batch_reduce",
    "task_vector_format",
    "prune_ratio",
    "svd_rank_fraction",
    "moe_layers",
    "output_routing_weights",
)


@strict
class WEMoEVisionConfig(CLIPVisionConfig):
    r"""Configuration of the WEMoE vision tower: [`CLIPVisionConfig`] plus the weight-ensembling MoE fields.

    Args:
        num_tasks (`int`, defaults to 1): E, the number of task vectors (fine-tuned models) merged.
        task_names (`list[str]`, *optional*): One name per task, in the order of the task vectors.
        init_lambda (`float`, defaults to 0.3): Initial routing weight of every task (the task-arithmetic
            scaling factor); also the factor of the task-arithmetic merge of the non-MLP weights.
        router_depth (`int`, defaults to 2): 0: a learned E-vector that ignores the input; 1: Linear(d, E);
            2: Linear(d, d) -> ReLU -> Linear(d, E) (the paper's default).
        shared_router (`bool`, defaults to `False`): E-WEMoE: ONE router shared by all WEMoE blocks, each block
            feeding it its own MLP input.
        batch_reduce (`bool`, defaults to `False`): Average the routing weights over the batch too, i.e. one merged
            MLP per batch. This is a different, transductive semantics (a sample's output then depends on the
            other samples of its batch); the paper evaluates per sample, which is the default.
        task_vector_format (`str`, defaults to `"dense"`): How the task vectors are stored: `"dense"`; `"pruned"`
            (magnitude-pruned per tensor, stored sparsely as indices + values); `"svd"` (truncated SVD factors of
            each 2-D tensor, 1-D tensors dense).
        prune_ratio (`float`, defaults to 0.9): The quantile of |value| at or below which `"pruned"` drops a
            task-vector tensor's entries (fusion_bench's `tv_prune_ratio`: about this share dropped).
        svd_rank_fraction (`float`, *optional*): Share of the singular values kept by `"svd"` (required there).
        moe_layers (`int` or `list[int]`, *optional*): Which blocks get a WEMoE MLP. `None`: all of them; an
            `int` n: the last n blocks; a list: those block indices. The others keep a dense (merged) MLP.
        output_routing_weights (`bool`, defaults to `False`): Return the per-sample routing weights of every
            WEMoE block.
    """

    model_type = "we_moe_vision_model"
    base_config_key = "vision_config"

    num_tasks: int = 1
    task_names: list[str] | None = None
    init_lambda: float | int = 0.3
    router_depth: int = 2
    shared_router: bool = False
    batch_reduce: bool = False
    task_vector_format: str = "dense"
    prune_ratio: float | int = 0.9
    svd_rank_fraction: float | int | None = None
    moe_layers: int | list[int] | None = None
    output_routing_weights: bool = False

    def validate_we_moe(self):
        """Part of `@strict` validation: refuse inconsistent WEMoE fields, naming the field."""
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {self.num_tasks}.")
        if self.task_names is not None and len(self.task_names) != self.num_tasks:
            raise ValueError(
                f"task_names has {len(self.task_names)} names but num_tasks={self.num_tasks}: give one name per task."
            )
        if self.router_depth not in (0, 1, 2):
            raise ValueError(f"router_depth must be 0, 1 or 2, got {self.router_depth}.")
        if self.task_vector_format not in TASK_VECTOR_FORMATS:
            raise ValueError(
                f"task_vector_format must be one of {TASK_VECTOR_FORMATS}, got {self.task_vector_format!r}."
            )
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}.")
        if self.svd_rank_fraction is not None and not 0.0 < self.svd_rank_fraction <= 1.0:
            raise ValueError(f"svd_rank_fraction must be in (0, 1], got {self.svd_rank_fraction}.")
        if self.task_vector_format == "svd" and self.svd_rank_fraction is None:
            raise ValueError('task_vector_format="svd" needs svd_rank_fraction (the share of singular values kept).')
        self.moe_layer_indices()  # validates moe_layers

    def moe_layer_indices(self) -> list[int]:
        """The indices of the WEMoE blocks, resolved from `moe_layers` as every hf-moe config resolves it."""
        return resolve_moe_layers(self.moe_layers, self.num_hidden_layers)


def _vision_field(name: str) -> property:
    """A joint-config view of the WEMoE field `name`, which lives in the vision tower (the modules read it there).

    Being a property, not a dataclass field, it is never written to the joint config.json twice; given to the
    constructor (or `from_pretrained`) it is set in the vision tower, after the tower exists.
    """

    def fget(self):
        tower = self.__dict__.get("vision_config")
        return getattr(tower, name, None) if isinstance(tower, WEMoEVisionConfig) else None

    def fset(self, value):
        tower = self.__dict__.get("vision_config")
        if isinstance(tower, WEMoEVisionConfig):
            # Not validated here: fields set one by one (`from_pretrained(..., **kwargs)`) may be inconsistent in
            # between; the model validates the tower when it is built.
            setattr(tower, name, value)

    return property(fget, fset, doc=f"`vision_config.{name}`; setting it sets the vision tower's.")


@strict
class WEMoEConfig(CLIPConfig):
    r"""Configuration of [`WEMoECLIPModel`]: a CLIP whose vision tower is a weight-ensembling MoE (WEMoE /
    E-WEMoE) and whose text tower is the pretrained CLIP's.

    The WEMoE fields (`num_tasks`, `task_names`, `init_lambda`, `router_depth`, `shared_router`, `batch_reduce`,
    `task_vector_format`, `prune_ratio`, `svd_rank_fraction`, `moe_layers`, `output_routing_weights`) live in
    `vision_config` (a [`WEMoEVisionConfig`]); given here, or set on this config, they set the vision tower's.

    Example:

    ```python
    >>> from hf_moe.modeling import WEMoEConfig, WEMoECLIPModel
    >>> config = WEMoEConfig(num_tasks=8, router_depth=2, shared_router=True, task_vector_format="pruned")
    >>> config.vision_config.prune_ratio
    0.9
    >>> model = WEMoECLIPModel(config)
    ```"""

    model_type = "we_moe"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": WEMoEVisionConfig}

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | WEMoEVisionConfig | None = None

    num_tasks = _vision_field("num_tasks")
    task_names = _vision_field("task_names")
    init_lambda = _vision_field("init_lambda")
    router_depth = _vision_field("router_depth")
    shared_router = _vision_field("shared_router")
    batch_reduce = _vision_field("batch_reduce")
    task_vector_format = _vision_field("task_vector_format")
    prune_ratio = _vision_field("prune_ratio")
    svd_rank_fraction = _vision_field("svd_rank_fraction")
    moe_layers = _vision_field("moe_layers")
    output_routing_weights = _vision_field("output_routing_weights")

    def __post_init__(self, **kwargs):
        # Joint WEMoE kwargs go to the vision tower before it is built, so that they are validated together.
        fields = {name: kwargs.pop(name) for name in WE_MOE_FIELD_NAMES if name in kwargs}
        if fields:
            if self.vision_config is None:
                self.vision_config = dict(fields)
            elif isinstance(self.vision_config, dict):
                self.vision_config = {**self.vision_config, **fields}
            else:
                for name, value in fields.items():
                    setattr(self.vision_config, name, value)
                self.vision_config.validate_we_moe()
        super().__post_init__(**kwargs)
        if not isinstance(self.vision_config, WEMoEVisionConfig):
            raise TypeError(
                f"{type(self).__name__} needs a WEMoEVisionConfig vision tower, "
                f"got {type(self.vision_config).__name__}."
            )
        if isinstance(self.text_config, WEMoEVisionConfig) or not isinstance(self.text_config, CLIPTextConfig):
            raise TypeError(f"{type(self).__name__} needs a CLIPTextConfig text tower.")
        if not getattr(self, "auto_map", None):
            # Saved folders then load through every Auto class users reach for, pipelines included.
            self.auto_map = {
                "AutoConfig": "configuration_we_moe.WEMoEConfig",
                "AutoModel": "modeling_we_moe.WEMoECLIPModel",
                "AutoModelForZeroShotImageClassification": "modeling_we_moe.WEMoECLIPModel",
            }


__all__ = ["TASK_VECTOR_FORMATS", "WE_MOE_FIELD_NAMES", "WEMoEConfig", "WEMoEVisionConfig"]

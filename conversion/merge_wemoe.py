"""Merge a pretrained CLIP and N fine-tunes of its vision tower into a WEMoE / E-WEMoE model.

Non-MLP weights of the vision tower: the task-arithmetic merge theta_0 + init_lambda * sum_i tau_i (from
`hf_moe.merging`); the MLP of every WEMoE block: the pretrained MLP plus the N task vectors (dense, magnitude-pruned
or truncated-SVD, as the model stores them), mixed per sample by a router initialised so that every task starts at
init_lambda. The text tower, the projections, the logit scale and the processor come from PRETRAINED.

PRETRAINED a `CLIPModel` (e.g. openai/clip-vit-base-patch32) gives a `WEMoECLIPModel` (zero-shot ready); a
vision-only PRETRAINED (`CLIPVisionModel`) gives a `WEMoECLIPVisionModel` (a WEMoE vision tower, no text tower).

    hf-moe merge-wemoe openai/clip-vit-base-patch32 tanganke/clip-vit-base-patch32_{sun397,stanford-cars,...} \
        --output_dir wemoe-b32 [--router_depth 2 --init_lambda 0.3 --shared_router --prune_ratio 0.9]
"""

import re
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.utils import logging

from ..arguments import HubArguments
from ..cards import CardSpec, Usage, command_line
from ..checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    StreamedModel,
    build_on_meta,
    check_finite_options,
    planned_state_dict,
    resolve_dtype,
)
from ..merging import (
    CheckpointTaskVectors,
    clip_vision_kind,
    load_processor,
    open_for_merge,
    streamed_merge,
    warn_input_mistakes,
)
from ..modeling.configuration_we_moe import WEMoEConfig, WEMoEVisionConfig
from ..modeling.modeling_we_moe import MLP_PARAMETER_NAMES, TASK_VECTOR_STORAGE, WEMoECLIPModel, WEMoECLIPVisionModel
from ..publish import check_destination, hub_keywords, write_model


logger = logging.get_logger(__name__)

MLP_KEY = re.compile(r"^encoder\.layers\.(?P<layer>\d+)\.mlp\.fc[12]\.(weight|bias)$")
ROUTER_KEY = re.compile(r"^encoder\.(layers\.\d+\.mlp\.)?router\.")
# Config fields of a CLIP vision config that are not architecture (left out when building the WEMoE config).
NOT_ARCHITECTURE = ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "auto_map")


def we_moe_vision_config(vision_config, **we_moe_fields) -> WEMoEVisionConfig:
    """A `WEMoEVisionConfig` with the architecture of the CLIP vision config `vision_config` and the WEMoE fields."""
    fields = {key: value for key, value in vision_config.to_dict().items() if key not in NOT_ARCHITECTURE}
    return WEMoEVisionConfig(**fields, **we_moe_fields)


@hub_keywords
def merge_wemoe(
    pretrained: str | Path,
    finetuned: list[str | Path],
    output_dir: str | Path,
    *,
    init_lambda: float = 0.3,
    router_depth: int = 2,
    shared_router: bool = False,
    prune_ratio: float | None = None,
    svd_rank_fraction: float | None = None,
    task_names: list[str] | None = None,
    batch_reduce: bool = False,
    moe_layers: int | list[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    return_model: bool = True,
    hub: HubArguments | None = None,
):
    """Build a WEMoE / E-WEMoE from a dense CLIPModel or CLIPVisionModel and its fine-tunes (hf-moe models refused).

    E-WEMoE: `shared_router` and `prune_ratio`. Every input must be a dense CLIP (model_type 'clip' or
    'clip_vision_model'): a WEMoE, CLIP-MoE, MoIIE or MoDE folder is refused, naming its family. NaN or inf in an
    input tensor or in an option is refused, naming it, with nothing written; a fine-tune given twice or equal to
    `pretrained`, and repeated task names, are warned about.

    Args:
        pretrained: Hub id or folder of the pretrained `CLIPModel` (-> `WEMoECLIPModel`) or `CLIPVisionModel`
            (-> `WEMoECLIPVisionModel`).
        finetuned: Hub ids or folders of fine-tunes of it (`CLIPModel` or `CLIPVisionModel`), one per task.
        output_dir: New or empty folder (`overwrite=True` replaces a non-empty one); may not hold an input.
        init_lambda: Initial routing weight of every task and the task-arithmetic factor of the non-MLP weights.
        router_depth: 0 (a learned vector), 1 (linear) or 2 (the paper's two-layer router).
        shared_router: E-WEMoE: one router shared by all blocks.
        prune_ratio: Store the task vectors magnitude-pruned per tensor, sparsely: the entries strictly above this
            quantile of |value| are kept, as fusion_bench prunes them (0.9 in E-WEMoE).
        svd_rank_fraction: Store the task vectors as truncated-SVD factors keeping this share of singular values.
        task_names: One name per fine-tuned model (default: the fine-tuned models' folder / repo names).
        batch_reduce: One merge per batch (transductive; off: per-sample routing as in the paper).
        moe_layers: Which blocks are WEMoE (None: all; n: the last n; a list: those); the others get the
            task-arithmetic MLP.
        seed: Seed of the router initialisation.
        dtype: Dtype of the written weights: "auto" (that of `pretrained`, as `from_pretrained` loads it),
            "float32", "bfloat16" or "float16". Task vectors, pruning and SVD are computed in float32 per tensor.
        max_shard_size: Larger outputs are written as shards of at most this size with an index.
        return_model: Load the written model and return it; False returns None (the command line's choice).
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's, default the base models' own where their
            cards state one). Default: no push.

    The checkpoints are read one tensor at a time and the model written tensor by tensor
    (`hf_moe.checkpoint_io`): memory holds the task vectors of one MLP tensor at a time, never the models.

    Returns:
        The model, loaded from `output_dir` (saved atomically with the processor of `pretrained` and a model
        card); None when `return_model=False`.
    """
    finetuned = list(finetuned)
    # The options as the command line names them, in its order (the card's command line repeats them).
    options = dict(
        init_lambda=init_lambda,
        router_depth=router_depth,
        shared_router=shared_router,
        prune_ratio=prune_ratio,
        svd_rank_fraction=svd_rank_fraction,
        batch_reduce=batch_reduce,
    )
    kind, base_config, vision_config, hub = check_merge_wemoe(
        pretrained, finetuned, output_dir, task_names, {**options, "moe_layers": moe_layers}, overwrite, dtype, hub
    )
    options.update(seed=seed, **({} if dtype in (None, "auto") else {"dtype": dtype}))
    base, finetuned_checkpoints = open_for_merge(pretrained, finetuned)
    try:
        source = CheckpointTaskVectors(base, finetuned_checkpoints)
        model, produce = build_wemoe(
            kind, base_config, vision_config, base, source, init_lambda=init_lambda, seed=seed, dtype=dtype
        )
        write_model(
            StreamedModel(model, produce, max_shard_size=max_shard_size),
            output_dir,
            card=wemoe_card(pretrained, finetuned, output_dir, kind, vision_config, options),
            processor=load_processor(pretrained),
            hub=hub,
            overwrite=overwrite,
            inputs=[pretrained, *finetuned],
        )
        source.warn_identical()
    finally:
        for checkpoint in [base, *finetuned_checkpoints]:
            checkpoint.close()
    logger.info(
        f"Saved a {len(finetuned)}-task WEMoE ({vision_config.task_vector_format} task vectors) to {output_dir}"
    )
    return type(model).from_pretrained(output_dir).eval() if return_model else None


def default_task_names(finetuned: list) -> list[str]:
    """The task names a merge records when none are given: each fine-tune's folder or repo name.

    The merged config's `task_names` is the record of which task vector is which (index i: `finetuned[i]`); what
    reads a WEMoE later (test-time adaptation, evaluation) takes the names from there, not from its own inputs."""
    return [Path(str(name).rstrip("/")).name for name in finetuned]


def check_merge_wemoe(
    pretrained, finetuned: list, output_dir, task_names, we_moe_options: dict, overwrite: bool, dtype: str, hub
) -> tuple[str, object, WEMoEVisionConfig, HubArguments]:
    """Every check that reads no weights, before anything is written: the options, the output folder and Hub repo,
    the inputs' configs (`we_moe_options`: the `WEMoEVisionConfig` fields the caller sets). Returns `(kind,
    base_config, vision_config, hub)`: the `clip_vision_kind` of `pretrained`, its config, the WEMoE vision config
    to build and `hub` with the repo to push to (`hf_moe.publish.check_destination`)."""
    if not finetuned:
        raise ValueError("merge_wemoe needs at least one FINETUNED model (one per task).")
    finite = ("init_lambda", "prune_ratio", "svd_rank_fraction")
    check_finite_options({key: we_moe_options[key] for key in finite}, "merge-wemoe option")
    prune_ratio, svd_rank_fraction = we_moe_options["prune_ratio"], we_moe_options["svd_rank_fraction"]
    if prune_ratio is not None and svd_rank_fraction is not None:
        raise ValueError("Give prune_ratio or svd_rank_fraction, not both: the task vectors are stored one way.")
    task_names = default_task_names(finetuned) if task_names is None else list(task_names)
    we_moe_fields = dict(
        we_moe_options,
        num_tasks=len(finetuned),
        task_names=task_names,
        task_vector_format="pruned" if prune_ratio is not None else "svd" if svd_rank_fraction is not None else "dense",
        prune_ratio=0.9 if prune_ratio is None else prune_ratio,
    )
    resolve_dtype(dtype, torch.float32)  # an unknown name is refused before any work
    hub = check_destination(output_dir, overwrite, [pretrained, *finetuned], hub)
    warn_input_mistakes(pretrained, finetuned, task_names=task_names)
    # Configs are read and compared first (also in open_for_merge), so bad options cost no weight reading.
    kind, base_config = clip_vision_kind(pretrained)
    try:
        vision_config = we_moe_vision_config(
            base_config.vision_config if kind == "CLIPModel" else base_config, **we_moe_fields
        )
    except Exception as err:  # @strict validation errors (not ValueErrors): name the option at fault in one line
        cause = err.__cause__ or err
        raise ValueError(f"Invalid WEMoE option: {' '.join(str(cause).split())}") from err
    return kind, base_config, vision_config, hub


def build_wemoe(kind: str, base_config, vision_config, base, source, *, init_lambda: float, seed: int, dtype: str):
    """The WEMoE model on the meta device (routers replayed from `seed`) and its `produce(name)` for
    `StreamedModel`: task arithmetic of the non-MLP weights (one tensor at a time), the WEMoE blocks' pretrained
    MLPs and task vectors, the rest from `base`, all in the output dtype."""
    output_dtype = resolve_dtype(dtype, base.dtype)
    # Non-MLP weights (and the MLPs of dense blocks): task arithmetic, one tensor at a time.
    merged = streamed_merge("task_arithmetic", source, scaling=init_lambda)
    torch.manual_seed(seed)
    if kind == "CLIPModel":
        config = WEMoEConfig(
            text_config=base_config.text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            projection_dim=base_config.projection_dim,
            logit_scale_init_value=base_config.logit_scale_init_value,
            initializer_factor=base_config.initializer_factor,
        )
        model, initial_value = build_on_meta(lambda: WEMoECLIPModel(config))
        tower_prefix = "vision_model."
    else:
        model, initial_value = build_on_meta(lambda: WEMoECLIPVisionModel(vision_config))
        tower_prefix = ""
    model = model.to(output_dtype).eval()
    model.config.name_or_path = ""
    sources = wemoe_sources(planned_state_dict(model), tower_prefix, base, set(source.keys), vision_config)
    return model, wemoe_producer(sources, base, source, merged, initial_value, vision_config, output_dtype)


WEMOE_DESCRIPTION = (
    "A weight-ensembling mixture-of-experts (WEMoE) CLIP built with [hf-moe](https://github.com/hf-moe/hf-moe): the "
    "fine-tuned models' task vectors are mixed per input by routers in every MLP (Tang et al., 2024; E-WEMoE: Shen et "
    "al., 2024). Train the routers on unlabeled data with `hf-moe tta-wemoe`."
)
# Zero-shot classification with a WEMoE CLIP, its routing weights (one mix of the tasks per image) and the pipeline.
WEMOE_USAGE = Usage(
    body=(
        'labels = ["a photo of a cat", "a photo of a dog"]',
        'inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)',
        "with torch.no_grad():",
        "    outputs = model(**inputs, output_routing_weights=True)",
        "print(dict(zip(labels, outputs.logits_per_image.softmax(dim=-1)[0].tolist())))",
        "# Per WEMoE block, the weight of each task vector for this image:",
        "print(outputs.routing_weights[0])",
        "",
        'classifier = pipeline("zero-shot-image-classification", model=model_id, trust_remote_code=True)',
        "print(classifier(image, candidate_labels=labels))",
    )
)
# A WEMoE vision tower: its image features and routing weights (its image processor is a plain CLIP one).
WEMOE_VISION_USAGE = Usage(
    processor_class="AutoImageProcessor",
    processor_remote_code=False,
    pipeline=False,
    body=(
        "with torch.no_grad():",
        '    outputs = model(**processor(images=image, return_tensors="pt"), output_routing_weights=True)',
        "print(outputs.pooler_output.shape, outputs.routing_weights[0])",
    ),
)


def wemoe_card(pretrained, finetuned, output_dir, kind: str, vision_config, options: dict) -> CardSpec:
    """The card of a merged WEMoE: what it is, how it was built (`wemoe_how_built`), its usage."""
    clip = kind == "CLIPModel"
    return CardSpec(
        base_model=[str(pretrained), *map(str, finetuned)],
        how_built=wemoe_how_built(pretrained, finetuned, vision_config.task_names, vision_config, options, output_dir),
        tags=("we-moe", "e-we-moe" if vision_config.shared_router else "we-moe-router", "model-merging", "clip"),
        description=WEMOE_DESCRIPTION,
        pipeline_tag="zero-shot-image-classification" if clip else "image-feature-extraction",
        usage=WEMOE_USAGE if clip else WEMOE_VISION_USAGE,
    )


def wemoe_sources(specs: dict, tower_prefix: str, base, merged_keys: set, vision_config) -> dict[str, tuple]:
    """Where each tensor of the WEMoE model comes from: `("router",)` (its seeded initialisation),
    `("task_vectors", layer, param)` (the stored task vectors of MLP `param` of block `layer`), `("merged", key)`
    (task arithmetic of the vision tower's `key`) or `("pretrained", name)` (the pretrained checkpoint's tensor:
    the WEMoE blocks' MLPs, integer buffers, the text tower, projections and logit scale). Raises naming what
    does not fit, before anything is read."""
    moe_layers = set(vision_config.moe_layer_indices())
    storage = TASK_VECTOR_STORAGE[vision_config.task_vector_format]
    owners = {}
    for layer in sorted(moe_layers):
        for param in MLP_PARAMETER_NAMES:
            key = f"encoder.layers.{layer}.mlp.{param}"
            if base.prefix + key not in base.specs:
                continue  # reported below as unfilled
            with torch.device("meta"):
                names = storage(vision_config, {param: tuple(base.specs[base.prefix + key].shape)}).state_dict()
            for attr in names:
                owners[f"{tower_prefix}encoder.layers.{layer}.mlp.task_vectors.{attr}"] = (layer, param)
    vision_keys = set(base.vision_keys)
    sources, missing, used = {}, [], set()
    for name in specs:
        key = name[len(tower_prefix) :] if name.startswith(tower_prefix) else None
        if key is not None and ".task_vectors." in key:
            if name not in owners:
                missing.append(name)
                continue
            sources[name] = ("task_vectors", *owners[name])
        elif key is not None and ROUTER_KEY.match(key):
            sources[name] = ("router",)
        elif key is not None and key in vision_keys:
            used.add(key)
            match = MLP_KEY.match(key)
            # WEMoE blocks keep the pretrained MLP (the task vectors are added per sample); the rest is merged.
            if key in merged_keys and not (match and int(match["layer"]) in moe_layers):
                sources[name] = ("merged", key)
            else:
                sources[name] = ("pretrained", base.prefix + key)
        elif key is None and name in base.specs:
            sources[name] = ("pretrained", name)
        else:
            missing.append(name)
    unexpected = sorted(vision_keys - used)
    if missing or unexpected:
        raise RuntimeError(
            f"The merged state dict does not fit the WEMoE tower: missing {missing}, unexpected {unexpected}"
        )
    return sources


def wemoe_producer(sources, base, source, merged, initial_value, vision_config, output_dtype):
    """`produce(name)` for `StreamedModel`: each tensor of the WEMoE model from its source (`wemoe_sources`), in
    `output_dtype`. Dense task vectors are stacked straight into the output tensor; pruned and SVD ones are
    stored by the model's own storage module (in float32) one task at a time, and the tasks' parts concatenated,
    when the first of their stored tensors is asked for; the others wait in a cache until written (the pruned
    layout's columns and counts come after all of a block's values)."""
    storage = TASK_VECTOR_STORAGE[vision_config.task_vector_format]
    # What the storage modules read of the config, for one task: pruning and SVD treat every task on its own
    # (per-row quantiles, top-k and one SVD per matrix), so they run task by task on a fraction of the memory.
    one_task = SimpleNamespace(
        num_tasks=1, prune_ratio=vision_config.prune_ratio, svd_rank_fraction=vision_config.svd_rank_fraction
    )
    cache = {}

    def cast(tensor):
        return tensor.to(output_dtype) if tensor.is_floating_point() else tensor

    def produce(name: str) -> torch.Tensor:
        kind, *where = sources[name]
        if kind == "router":
            return cast(initial_value(name))
        if kind == "merged":
            return cast(merged(where[0]))
        if kind == "pretrained":
            return cast(base.get(where[0]))
        if name in cache:
            return cache.pop(name)
        layer, param = where
        key = f"encoder.layers.{layer}.mlp.{param}"
        if vision_config.task_vector_format == "dense":  # the stack itself, `[tasks, *shape]`
            stacked = torch.empty((source.num_tasks, *source.shape(key)), dtype=output_dtype)
            for index in range(source.num_tasks):
                stacked[index] = source.task_vector(index, key)
            return stacked
        parts = {}
        for index in range(source.num_tasks):
            task_vector = source.task_vector(index, key)
            with torch.device("cpu"):
                module = storage(one_task, {param: tuple(task_vector.shape)})
            module.fill(param, task_vector.unsqueeze(0))
            for attr, tensor in module.state_dict().items():
                parts.setdefault(attr, []).append(cast(tensor))
            del task_vector, module
        prefix = name[: name.index(".task_vectors.")]
        for attr, tensors in parts.items():
            cache[f"{prefix}.task_vectors.{attr}"] = torch.cat(tensors)
        return cache.pop(name)

    return produce


def wemoe_how_built(pretrained, finetuned, task_names, vision_config, options, output_dir) -> str:
    listed = "\n".join(f"{i}. `{name}`: `{ft}`" for i, (name, ft) in enumerate(zip(task_names, finetuned)))
    storage = "dense"
    if vision_config.task_vector_format == "pruned":
        storage = (
            f"magnitude-pruned per tensor (the entries above the {vision_config.prune_ratio:.0%} quantile of |value| "
            "kept), stored as indices + values"
        )
    elif vision_config.task_vector_format == "svd":
        storage = f"truncated SVD ({vision_config.svd_rank_fraction:.0%} of singular values), stored as factors"
    router = "one router shared by all blocks (E-WEMoE)" if vision_config.shared_router else "one router per block"
    command = command_line("merge-wemoe", [pretrained, *finetuned], {"output_dir": output_dir, **options})
    command += " " + " ".join(["--task_names", *task_names])
    return (
        f"**WEMoE merge** of {len(finetuned)} fine-tuned model(s) of `{pretrained}`: non-MLP weights by task "
        f"arithmetic (lambda = {vision_config.init_lambda}); the MLPs of blocks {vision_config.moe_layer_indices()} "
        f"are weight-ensembling MoEs (pretrained MLP + task vectors, {storage}), depth-{vision_config.router_depth} "
        f"routers ({router}) initialised so every task starts at {vision_config.init_lambda} (seed "
        f"{options['seed']}); routing per sample"
        + (" averaged over the batch (batch_reduce)" if vision_config.batch_reduce else "")
        + f". Text tower and processor from `{pretrained}`.\n\nTasks:\n\n{listed}\n\n```bash\n{command}\n```"
    )

"""Model merging of fine-tuned CLIP vision towers: task vectors and ONE registry of merge methods by name.

A merge method is one function plus one entry in `MERGE_METHODS` (as in mergekit): it takes the pretrained
vision-tower state dict theta_0 and the task vectors tau_i = theta_i - theta_0 (floating tensors only, same keys)
and returns the merged state dict. Options are its keyword arguments, checked by name before anything is loaded.

    average          theta_0 + mean_i tau_i             (= the mean of the fine-tuned models)
    task_arithmetic  theta_0 + scaling * sum_i tau_i    (Ilharco et al., 2023; scaling 0.3)
    ties             theta_0 + scaling * TIES(tau)      (Yadav et al., 2023: trim to the top `density` by magnitude,
                                                         elect the sign of the summed mass, disjoint sum (default,
                                                         as fusion_bench) or mean)

A trained method (AdaMerging's coefficients, for instance) registers the same way:
`register_merge_method("adamerging", fn)`, `fn(pretrained, task_vectors, coefficients=...)`.

`merge_clip_vision("ties", PRETRAINED, [FINETUNED, ...], OUTPUT_DIR)` writes an ordinary `CLIPVisionModel` folder
(a `CLIPModel` one when PRETRAINED is a `CLIPModel`: text tower, projections and logit scale from PRETRAINED) with
the processor and a model card, atomically. Inputs are Hub ids or folders of `CLIPModel` or `CLIPVisionModel`
(`CLIPVisionModelWithProjection` too); only their vision towers are merged.
"""

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from .fileio import check_output_dir
from .hub import check_hub_model_id, save_model_folder
from .loading import load_config, load_pretrained


logger = logging.get_logger(__name__)

StateDict = dict[str, torch.Tensor]

# Config fields that make two CLIP vision towers the same architecture (beyond the shapes of their tensors).
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
)
VISION_MODEL_TYPES = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel"}
LAYER_KEY = re.compile(r"^encoder\.layers\.(?P<layer>\d+)\.")


# --------------------------------------------------------------------------------------------- task vectors


def check_compatible(pretrained: StateDict, finetuned: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise a ValueError naming the first key missing, extra, of another shape or dtype kind in any of
    `finetuned` compared to `pretrained` (`names`: how to call the inputs in the message)."""
    if not finetuned:
        raise ValueError("Merging needs at least one fine-tuned model.")
    names = list(names) if names is not None else ["pretrained"] + [f"finetuned[{i}]" for i in range(len(finetuned))]
    for name, other in zip(names[1:], finetuned):
        missing = sorted(pretrained.keys() - other.keys())
        extra = sorted(other.keys() - pretrained.keys())
        if missing or extra:
            key = (missing or extra)[0]
            where = f"missing from '{name}'" if missing else f"in '{name}' but not in '{names[0]}'"
            more = len(missing) + len(extra) - 1
            raise ValueError(
                f"Key {key} is {where}" + (f" (and {more} more keys differ)" if more else "") + ": not the same model."
            )
        for key, tensor in pretrained.items():
            if other[key].shape != tensor.shape:
                raise ValueError(
                    f"{key}: shape {tuple(other[key].shape)} in '{name}' vs {tuple(tensor.shape)} in '{names[0]}'."
                )
            if other[key].is_floating_point() != tensor.is_floating_point():
                raise ValueError(f"{key}: dtype {other[key].dtype} in '{name}' vs {tensor.dtype} in '{names[0]}'.")
            if not tensor.is_floating_point() and not torch.equal(other[key], tensor):
                raise ValueError(f"{key}: the integer buffer differs between '{names[0]}' and '{name}'.")


def task_vector(pretrained: StateDict, finetuned: StateDict) -> StateDict:
    """tau = theta_finetuned - theta_pretrained for every floating tensor, in fp32 (integer buffers are left out)."""
    check_compatible(pretrained, [finetuned])
    return {
        key: finetuned[key].float() - tensor.float() for key, tensor in pretrained.items() if tensor.is_floating_point()
    }


def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict], names: Sequence[str] | None = None):
    """The task vector of each of `finetuned` (checked against `pretrained` first, naming any bad key)."""
    check_compatible(pretrained, finetuned, names)
    return [task_vector(pretrained, other) for other in finetuned]


def add_to_pretrained(pretrained: StateDict, delta: StateDict) -> StateDict:
    """theta_0 + delta in the dtype of theta_0 (tensors not in `delta`, such as integer buffers, unchanged)."""
    return {
        key: (tensor.float() + delta[key]).to(tensor.dtype) if key in delta else tensor.clone()
        for key, tensor in pretrained.items()
    }


def layer_index(key: str) -> int | None:
    """The encoder block of a vision-tower key (`encoder.layers.3.mlp.fc1.weight` -> 3), None outside blocks.
    For layer-wise methods (AdaMerging) that group tensors by block."""
    match = LAYER_KEY.match(key)
    return int(match["layer"]) if match else None


# --------------------------------------------------------------------------------------------- methods


def average(pretrained: StateDict, task_vectors: Sequence[StateDict]) -> StateDict:
    """The simple average of the fine-tuned models: theta_0 + mean_i tau_i."""
    return add_to_pretrained(
        pretrained, {key: sum(tv[key] for tv in task_vectors) / len(task_vectors) for key in task_vectors[0]}
    )


def task_arithmetic(pretrained: StateDict, task_vectors: Sequence[StateDict], scaling: float = 0.3) -> StateDict:
    """Task arithmetic: theta_0 + scaling * sum_i tau_i."""
    return add_to_pretrained(
        pretrained, {key: scaling * sum(tv[key] for tv in task_vectors) for key in task_vectors[0]}
    )


TIES_AGGREGATIONS = ("sum", "mean")


def trim_task_vector(task_vector: StateDict, density: float, scope: str = "task_vector") -> StateDict:
    """Keep the entries of a task vector largest by magnitude, zero the rest.

    `scope="task_vector"` (TIES' trim): one threshold over all tensors of the task vector, as the TIES repository's
    and fusion_bench's `topk_values_mask` compute it: with d entries, keep those at or above the
    `(int(density * d) + 1)`-th largest magnitude, i.e. one more than `int(density * d)` (more with ties at the
    threshold; at least one entry). `"tensor"`: each tensor separately, exactly `int(density * n)` entries (peft's
    `magnitude_based_pruning`). `density=1` keeps everything.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density (the fraction of each task vector kept) must be in (0, 1], got {density}.")
    if density == 1.0:
        return dict(task_vector)
    if scope == "tensor":
        from peft.utils.merge_utils import magnitude_based_pruning

        return {key: magnitude_based_pruning(tensor, density) for key, tensor in task_vector.items()}
    if scope != "task_vector":
        raise ValueError(f"trim scope must be 'task_vector' or 'tensor', got {scope!r}.")
    magnitudes = torch.cat([tensor.abs().reshape(-1) for tensor in task_vector.values()])
    size = magnitudes.numel()
    # The reference takes the (d - int(density * d))-th smallest magnitude as the threshold, which is the
    # (int(density * d) + 1)-th largest; entries at least that large are kept, ties included.
    threshold = torch.kthvalue(magnitudes, size - int(density * size)).values
    return {key: torch.where(tensor.abs() >= threshold, tensor, 0.0) for key, tensor in task_vector.items()}


def ties(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    scaling: float = 0.3,
    density: float = 0.2,
    trim: str = "task_vector",
    aggregation: str = "sum",
) -> StateDict:
    """TIES-merging: trim, elect signs, disjoint aggregation, then theta_0 + `scaling` * the result.

    As the TIES repository and fusion_bench compute it: each task vector is trimmed to its largest entries by
    magnitude ([`trim_task_vector`]: `density`, over the whole task vector, or per tensor with `trim="tensor"`);
    each entry's sign is the sign of the summed trimmed values (an entry summing to exactly 0 takes the sign that
    most entries of the whole task vector elected); the trimmed values agreeing with the elected sign are then
    aggregated: `aggregation="sum"` adds them (the default: fusion_bench's default `merge_func: sum`, and the
    `dis-sum` with density 0.2 and lambda 0.3 behind the TIES rows of the AdaMerging and WEMoE papers), `"mean"`
    averages them (the TIES paper's `dis-mean`, also peft's `ties`). `scaling` stays 0.3 for both.
    """
    if aggregation not in TIES_AGGREGATIONS:
        raise ValueError(f"ties aggregation must be one of {TIES_AGGREGATIONS}, got {aggregation!r}.")
    trimmed = [trim_task_vector(tv, density, trim) for tv in task_vectors]
    keys = list(trimmed[0])
    # The reference resolves the zero-mass entries with the majority of the elected signs over the whole vector.
    elected_total = sum(torch.stack([tv[key] for tv in trimmed]).sum(dim=0).sign().sum() for key in keys)
    majority = torch.sign(torch.as_tensor(elected_total, dtype=torch.float32))
    merged = {}
    for key in keys:
        stacked = torch.stack([tv[key] for tv in trimmed])
        elected = stacked.sum(dim=0).sign()
        elected = torch.where(elected == 0, majority, elected)
        selected = stacked * torch.where(elected > 0, stacked > 0, stacked < 0)
        total = selected.sum(dim=0)
        if aggregation == "mean":
            total = total / (selected != 0).sum(dim=0).clamp(min=1)
        merged[key] = scaling * total
    return add_to_pretrained(pretrained, merged)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: `fn(pretrained, task_vectors, **options) -> merged state dict`."""

    name: str
    fn: Callable[..., StateDict]
    description: str

    def options(self) -> dict:
        """The method's options and their defaults."""
        parameters = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p.default for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def check_options(self, options: dict) -> None:
        signature = inspect.signature(self.fn)
        if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            accepted = ", ".join(self.options()) or "none"
            raise ValueError(f"Merge method '{self.name}' has no option {unknown[0]!r} (its options: {accepted}).")


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str, fn: Callable | None = None, *, description: str | None = None, overwrite=False):
    """Register `fn(pretrained, task_vectors, **options)` as merge method `name` (usable as a decorator). A trained
    method registers the function that applies its learned parameters (passed as options)."""

    def register(fn):
        if name in MERGE_METHODS and not overwrite:
            raise ValueError(f"Merge method '{name}' is already registered; pass overwrite=True to replace it.")
        text = description or (inspect.getdoc(fn) or name).split("\n")[0]
        MERGE_METHODS[name] = MergeMethod(name, fn, text)
        return fn

    return register(fn) if fn is not None else register


register_merge_method("average", average)
register_merge_method("task_arithmetic", task_arithmetic)
register_merge_method("ties", ties)


def get_merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ValueError(f"Unknown merge method '{name}'; registered: {', '.join(MERGE_METHODS)}.")
    return MERGE_METHODS[name]


def merge_state_dicts(
    method: str, pretrained: StateDict, finetuned: Sequence[StateDict], names: Sequence[str] | None = None, **options
) -> StateDict:
    """Merge the fine-tuned state dicts `finetuned` of `pretrained` with the registered `method`."""
    merge = get_merge_method(method)
    merge.check_options(options)
    return merge.fn(pretrained, task_vectors(pretrained, finetuned, names), **options)


# --------------------------------------------------------------------------------------------- CLIP checkpoints


def clip_vision_kind(name_or_path: str | Path) -> tuple[str, object]:
    """("CLIPModel" | "CLIPVisionModel", config) of a Hub id or folder; anything else refused, naming it."""
    config = load_config(name_or_path, require_moe=False)
    kind = VISION_MODEL_TYPES.get(config.model_type)
    if kind is None:
        raise ValueError(
            f"'{name_or_path}' is a '{config.model_type}' model; merging needs a dense CLIPModel or CLIPVisionModel "
            "(model_type 'clip' or 'clip_vision_model')."
        )
    return kind, config


def vision_config_of(config):
    return config.vision_config if config.model_type == "clip" else config


def check_same_architecture(configs: Sequence, names: Sequence[str]) -> None:
    """Refuse vision towers of different architectures (before any weights are loaded), naming the field."""
    reference = vision_config_of(configs[0])
    for name, config in zip(names[1:], configs[1:]):
        vision = vision_config_of(config)
        for field in ARCHITECTURE_FIELDS:
            if getattr(vision, field, None) != getattr(reference, field, None):
                raise ValueError(
                    f"vision_config.{field} is {getattr(vision, field, None)} in '{name}' but "
                    f"{getattr(reference, field, None)} in '{names[0]}': not fine-tunes of the same model."
                )


def load_clip_vision_state_dict(name_or_path: str | Path) -> StateDict:
    """The vision-tower state dict (keys as in `CLIPVisionModel`: `embeddings.*`, `encoder.layers.*`, ...) of a
    Hub id or folder holding a `CLIPModel`, `CLIPVisionModel` or `CLIPVisionModelWithProjection`."""
    return load_clip_vision(name_or_path)[1]


def load_clip_vision(name_or_path: str | Path):
    """(the loaded model, its vision-tower state dict) of a CLIP or CLIP vision checkpoint."""
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    kind, config = clip_vision_kind(name_or_path)
    if kind == "CLIPModel":
        model = load_pretrained(name_or_path, CLIPModel, config=config)
        return model, {key: tensor.detach() for key, tensor in model.vision_model.state_dict().items()}
    with_projection = "CLIPVisionModelWithProjection" in (config.architectures or [])
    model = load_pretrained(
        name_or_path, CLIPVisionModelWithProjection if with_projection else CLIPVisionModel, config=config
    )
    tower = model.vision_model if hasattr(model, "vision_model") else model
    return model, {
        key: tensor.detach() for key, tensor in tower.state_dict().items() if not key.startswith("visual_projection")
    }


def vision_tower_module(model):
    """The module whose state dict is the vision tower: `CLIPModel.vision_model`, or a `CLIPVisionModel` itself."""
    return model.vision_model if hasattr(model, "vision_model") else model


def load_for_merge(pretrained: str | Path, finetuned: Sequence[str | Path]):
    """Check the configs of all inputs (same vision architecture), then load them: (pretrained model, its vision
    state dict, the fine-tuned vision state dicts), keys and shapes checked, naming the first bad key."""
    if not finetuned:
        raise ValueError("Merging needs at least one FINETUNED model.")
    names = [str(pretrained), *map(str, finetuned)]
    configs = [clip_vision_kind(name)[1] for name in [pretrained, *finetuned]]
    check_same_architecture(configs, names)
    base_model, base_state = load_clip_vision(pretrained)
    finetuned_states = [load_clip_vision_state_dict(name) for name in finetuned]
    check_compatible(base_state, finetuned_states, names)
    return base_model, base_state, finetuned_states


def load_processor(name_or_path: str | Path):
    """The processor of a checkpoint (an image processor alone for vision-only ones), or None (logged)."""
    from transformers import AutoImageProcessor, AutoProcessor

    for loader in (AutoProcessor, AutoImageProcessor):
        try:
            return loader.from_pretrained(name_or_path)
        except Exception as err:  # a bare weights folder: the model is usable, just without a processor
            reason = err
    logger.warning(f"No processor could be loaded from '{name_or_path}' ({reason}); the output folder will lack one.")
    return None


def vision_usage(model_id: str) -> str:
    return "\n".join(
        [
            "import torch",
            "from PIL import Image",
            "from transformers import AutoImageProcessor, CLIPVisionModel",
            "",
            f"model_id = {model_id!r}",
            "model = CLIPVisionModel.from_pretrained(model_id).eval()",
            "processor = AutoImageProcessor.from_pretrained(model_id)",
            'image = Image.new("RGB", (224, 224), "white")  # your image: Image.open("photo.jpg")',
            "with torch.no_grad():",
            '    features = model(**processor(images=image, return_tensors="pt")).pooler_output',
            "print(features.shape)",
        ]
    )


def merge_command_line(method: str, pretrained, finetuned, output_dir, options: dict) -> str:
    flags = {
        "scaling": "--scaling",
        "density": "--ties_density",
        "trim": "--ties_trim",
        "aggregation": "--ties_aggregation",
    }
    parts = [
        "hf-moe",
        "merge",
        "--method",
        method,
        str(pretrained),
        *map(str, finetuned),
        "--output_dir",
        str(output_dir),
    ]
    for key, value in options.items():
        parts += [flags.get(key, f"--{key}"), str(value)]
    return " ".join(parts)


def merge_clip_vision(
    method: str,
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    hub_private_repo: bool | None = None,
    **options,
):
    """Merge the vision towers of `finetuned` (fine-tunes of `pretrained`) with the registered merge `method` and
    write the result to `output_dir` (atomically, with the processor of `pretrained` and a model card).

    Args:
        method: A name in `MERGE_METHODS` (`average`, `task_arithmetic`, `ties`, or one registered later).
        pretrained: Hub id or folder of a `CLIPModel` or `CLIPVisionModel`. A `CLIPModel` gives a `CLIPModel`
            output (its text tower, projections and logit scale kept), a vision model a `CLIPVisionModel`.
        finetuned: Hub ids or folders of fine-tunes of `pretrained` (`CLIPModel` or `CLIPVisionModel`; only their
            vision towers are used).
        output_dir: New or empty folder (`overwrite=True` replaces a non-empty one); may not hold an input.
        options: The method's options (`scaling`, `density`, `trim`, `aggregation`, ...), checked by name first.

    Returns:
        The merged model (also saved).
    """
    merge = get_merge_method(method)
    merge.check_options(options)
    finetuned = list(finetuned)
    inputs = [pretrained, *finetuned]
    check_output_dir(output_dir, overwrite, inputs=inputs)
    hub_model_id = check_hub_model_id(output_dir, push_to_hub, hub_model_id)

    model, base_state, finetuned_states = load_for_merge(pretrained, finetuned)
    merged = merge.fn(base_state, task_vectors(base_state, finetuned_states, list(map(str, inputs))), **options)
    vision_tower_module(model).load_state_dict(merged, strict=True)
    model = model.eval()
    model.config.name_or_path = ""
    is_clip = model.config.model_type == "clip"

    listed = "\n".join(f"{i}. `{name}`" for i, name in enumerate(finetuned))
    shown = {**merge.options(), **options}
    how_built = (
        f"**{method}** merge ({merge.description}) of the vision towers of {len(finetuned)} fine-tuned model(s) of "
        f"`{pretrained}`, built with `hf_moe.merging`"
        + (" (text tower, projections and logit scale from the pretrained model)" if is_clip else "")
        + ".\n\nFine-tuned models:\n\n"
        + listed
        + "\n\nOptions: "
        + (", ".join(f"`{k}={v}`" for k, v in shown.items()) or "none")
        + f"\n\n```bash\n{merge_command_line(method, pretrained, finetuned, output_dir, options)}\n```"
    )
    model_name = hub_model_id or Path(output_dir).name
    card = {
        "base_model": [str(pretrained), *map(str, finetuned)],
        "how_built": how_built,
        "tags": ["merge", "model-merging", method, "clip"],
        "model_name": model_name,
        "description": (
            f"A dense CLIP{'' if is_clip else ' vision model'} merged from fine-tuned models by {method} with "
            "[hf-moe](https://github.com/hf-moe/hf-moe): an ordinary transformers model, no remote code needed."
        ),
        "pipeline_tag": "zero-shot-image-classification" if is_clip else "image-feature-extraction",
        "usage": None if is_clip else vision_usage(model_name),
    }
    save_model_folder(
        model,
        load_processor(pretrained),
        output_dir,
        overwrite=overwrite,
        card=card,
        inputs=inputs,
        push_to_hub=push_to_hub,
        hub_model_id=hub_model_id,
        hub_token=hub_token,
        hub_private_repo=hub_private_repo,
    )
    logger.info(f"Saved the {method} merge of {len(finetuned)} model(s) to {output_dir}")
    return model

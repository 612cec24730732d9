"""Model merging of fine-tuned CLIP vision towers: task vectors and ONE registry of merge methods by name.

A merge method is one function plus one entry in `MERGE_METHODS` (as in mergekit): it takes the pretrained
vision-tower state dict theta_0 and the task vectors tau_i = theta_i - theta_0 (floating tensors only, same keys)
and returns the merged state dict. Options are its keyword arguments, checked by name before anything is loaded.

    average          theta_0 + mean_i tau_i             (= the mean of the fine-tuned models)
    task_arithmetic  theta_0 + scaling * sum_i tau_i    (Ilharco et al., 2023; scaling 0.3)
    ties             theta_0 + scaling * TIES(tau)      (Yadav et al., 2023: trim to the top `density` by magnitude,
                                                         elect the sign of the summed mass, disjoint sum (default,
                                                         as fusion_bench) or mean)
    dare_linear      theta_0 + scaling * sum_i DARE(tau_i)   (Yu et al., 2024: drop each entry with probability
                                                         1 - density, rescale the rest by 1 / density; peft's)
    dare_ties        theta_0 + DARE, then TIES' sign election and disjoint mean (peft's `dare_ties`)
    adamerging       theta_0 + sum_i lambda_{key,i} tau_i   (Yang et al., 2024: coefficients learned per tensor and
                                                         task by `hf-moe adamerging`; `trained_by` says so)

Every method is registered when this module is imported. A method whose options are learned from data (AdaMerging's
coefficients) registers the function that applies them, with `trained_by` naming the command that learns them:
`hf-moe merge` refuses it and points there. `hf-moe merge`'s flags are the static methods' options, read from their
signatures (`merge_option_fields`); `MERGE_OPTION_HELP` adds each option's help and the older flag names it keeps.

`merge_clip_vision("ties", PRETRAINED, [FINETUNED, ...], OUTPUT_DIR)` writes an ordinary `CLIPVisionModel` folder
(a `CLIPModel` one when PRETRAINED is a `CLIPModel`: text tower, projections and logit scale from PRETRAINED) with
the processor and a model card, atomically. Inputs are Hub ids or folders of `CLIPModel` or `CLIPVisionModel`
(`CLIPVisionModelWithProjection` too); only their vision towers are merged.
"""

import dataclasses
import inspect
import re
import typing
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from .arguments import HubArguments
from .cards import CardSpec, Usage
from .checkpoint_io import check_finite, check_finite_options, release_free_memory, tensor_sum
from .loading import check_model_type, load_config, load_pretrained, load_processor
from .publish import check_destination, hub_keywords, write_model


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


def input_labels(pretrained, finetuned: Sequence) -> list[str]:
    """How messages name the inputs of a merge: "the pretrained model 'P'", "fine-tune 2 of 3 ('F')"."""
    return [
        f"the pretrained model '{pretrained}'",
        *(f"fine-tune {i} of {len(finetuned)} ('{name}')" for i, name in enumerate(finetuned, 1)),
    ]


def check_finite_state_dicts(state_dicts: Sequence[StateDict], labels: Sequence[str]) -> None:
    """Refuse a NaN or inf in any floating tensor of `state_dicts`, naming its input (`labels`) and key."""
    for state_dict, label in zip(state_dicts, labels):
        for key, tensor in state_dict.items():
            check_finite(tensor, key, label)


def _difference(pretrained: StateDict, finetuned: StateDict) -> StateDict:
    return {
        key: finetuned[key].float() - tensor.float() for key, tensor in pretrained.items() if tensor.is_floating_point()
    }


def task_vector(pretrained: StateDict, finetuned: StateDict) -> StateDict:
    """tau = theta_finetuned - theta_pretrained for every floating tensor, in fp32 (integer buffers are left out).
    NaN or inf in either is refused, naming the key."""
    check_compatible(pretrained, [finetuned])
    check_finite_state_dicts([pretrained, finetuned], ["pretrained", "finetuned"])
    return _difference(pretrained, finetuned)


def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict], names: Sequence[str] | None = None):
    """The task vector of each of `finetuned` (checked against `pretrained` first, naming any bad key; NaN or inf
    refused, naming the input and key). A fine-tune equal to `pretrained`, or two equal fine-tunes, are warned
    about (`names`: the inputs' names, the pretrained one first)."""
    check_compatible(pretrained, finetuned, names)
    names = list(names) if names is not None else ["pretrained", *(f"finetuned[{i}]" for i in range(len(finetuned)))]
    check_finite_state_dicts([pretrained, *finetuned], input_labels(names[0], names[1:]))
    fingerprints = [fingerprint(state_dict) for state_dict in [pretrained, *finetuned]]
    warn_identical_inputs(fingerprints[0], fingerprints[1:], names)
    return [_difference(pretrained, other) for other in finetuned]


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """`tensor_sum` of each floating tensor: two state dicts with equal fingerprints hold the same weights, to any
    practical certainty (what the streamed merges get for free from `LazyCheckpoint.sums`)."""
    return {key: tensor_sum(tensor) for key, tensor in state_dict.items() if tensor.is_floating_point()}


def _input_identity(name) -> str:
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def warn_identical_inputs(pretrained: dict, finetuned: Sequence[dict | None], names: Sequence[str]) -> None:
    """Warn about a fine-tune holding the pretrained model's weights (its task vector is zero) and about fine-tunes
    holding the same weights. `pretrained`, `finetuned`: `fingerprint`s of the inputs (None: unknown); `names`:
    pretrained first. Inputs given by the same path are left to `warn_input_mistakes`."""
    base_name, finetuned_names = names[0], list(names[1:])
    labels = input_labels(base_name, finetuned_names)[1:]
    first_of = {}
    for index, sums in enumerate(finetuned):
        if not sums:
            continue
        identity = _input_identity(finetuned_names[index])
        if sums == pretrained:
            if identity != _input_identity(base_name):
                logger.warning(
                    f"{labels[index]} holds the weights of the pretrained model: its task vector is zero, so it only "
                    "dilutes the merge. Did you mean another fine-tune?"
                )
            continue
        key = tuple(sorted(sums.items()))
        if key not in first_of:
            first_of[key] = index
        elif identity != _input_identity(finetuned_names[first_of[key]]):
            logger.warning(
                f"{labels[index]} holds the same weights as {labels[first_of[key]]}: that fine-tune counts twice in "
                "the merge. Did you mean another fine-tune?"
            )


def warn_input_mistakes(
    pretrained, finetuned: Sequence, task_names: Sequence[str] | None = None, num_tasks: int | None = None
) -> None:
    """Warn (before any work) about plausible mistakes in a merge's inputs: the pretrained model given as a
    fine-tune, a fine-tune given twice (same path), a task name given twice, and more fine-tunes than the
    `num_tasks` task folders of a method trained on them (AdaMerging)."""
    labels = input_labels(pretrained, finetuned)[1:]
    base, seen = _input_identity(pretrained), {}
    for index, name in enumerate(finetuned):
        identity = _input_identity(name)
        if identity == base:
            logger.warning(
                f"{labels[index]} is the pretrained model itself: its task vector is zero, so it only dilutes the "
                "merge. Did you mean another fine-tune?"
            )
        elif identity in seen:
            logger.warning(f"{labels[index]} is {labels[seen[identity]]} given again: it counts twice in the merge.")
        else:
            seen[identity] = index
    if task_names is not None:
        repeated = sorted({name for name in task_names if list(task_names).count(name) > 1})
        if repeated:
            logger.warning(
                f"Task name(s) {repeated} are given to several fine-tunes, so the tasks cannot be told apart by name "
                "(the default names are the fine-tunes' folder names): give one distinct name per fine-tune "
                "(--task_names)."
            )
    if num_tasks is not None and len(finetuned) > num_tasks:
        logger.warning(
            f"{len(finetuned)} fine-tunes but {num_tasks} task folder(s): the coefficients of the fine-tunes whose "
            "task has no images are learned from the other tasks' images only. Give one task folder per fine-tune, "
            "in the same order."
        )


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
    return {key: trim_to_threshold(tensor, threshold) for key, tensor in task_vector.items()}


def trim_to_threshold(tensor: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """TIES' trim of one tensor given the task vector's threshold: entries with |value| >= threshold kept."""
    return torch.where(tensor.abs() >= threshold, tensor, 0.0)


def ties(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    scaling: float = 0.3,
    density: float = 0.2,
    trim: str = "task_vector",
    aggregation: typing.Literal["sum", "mean"] = "sum",
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
    elected_total = sum(ties_elected_sign_sum(torch.stack([tv[key] for tv in trimmed])) for key in keys)
    majority = torch.sign(torch.as_tensor(elected_total, dtype=torch.float32))
    merged = {}
    for key in keys:
        merged[key] = ties_disjoint_merge(torch.stack([tv[key] for tv in trimmed]), majority, scaling, aggregation)
    return add_to_pretrained(pretrained, merged)


def ties_elected_sign_sum(stacked: torch.Tensor) -> torch.Tensor:
    """The sum of the signs TIES elects for one tensor (`stacked`: its trimmed task vectors, `[tasks, ...]`);
    summed over all tensors, its sign is the majority sign given to zero-mass entries."""
    return stacked.sum(dim=0).sign().sum()


def ties_disjoint_merge(stacked: torch.Tensor, majority: torch.Tensor, scaling: float, aggregation: str):
    """`scaling` times TIES' disjoint aggregation (`sum` or `mean`) of one tensor's trimmed task vectors
    `stacked` (`[tasks, ...]`), entries of zero mass taking the sign `majority`."""
    elected = stacked.sum(dim=0).sign()
    elected = torch.where(elected == 0, majority, elected)
    selected = stacked * torch.where(elected > 0, stacked > 0, stacked < 0)
    total = selected.sum(dim=0)
    if aggregation == "mean":
        total = total / (selected != 0).sum(dim=0).clamp(min=1)
    return scaling * total


def adamerging_merge(
    pretrained: StateDict, task_vectors: Sequence[StateDict], coefficients: dict | None = None, clamp: bool = True
) -> StateDict:
    """theta_0 + sum_i lambda_{key,i} tau_{i,key} with `coefficients` {key: [lambda per task]} (learned by
    `hf_moe.we_moe.adamerging.AdaMergingCLIP`; a key missing: 0.3 for every task), clamped to [0, 1] if `clamp`."""
    coefficients = coefficients or {}
    delta = {}
    for key in task_vectors[0]:
        weights = torch.as_tensor(coefficients.get(key, [0.3] * len(task_vectors)), dtype=torch.float32)
        if weights.shape != (len(task_vectors),):
            raise ValueError(f"coefficients[{key!r}] needs one value per task ({len(task_vectors)}), got {weights}.")
        if clamp:
            weights = weights.clamp(0.0, 1.0)
        delta[key] = sum(weight * tv[key].float() for weight, tv in zip(weights, task_vectors))
    return add_to_pretrained(pretrained, delta)


def dare_seed(seed: int, key: str) -> int:
    """The seed of tensor `key`'s DARE masks: each tensor draws from its own generator state (the option's seed and
    the tensor's name), so a merge is the same whichever order its tensors are merged in (in memory, streamed a
    tensor at a time, or in another process)."""
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode("utf-8"))) % (1 << 63)


# Entries of a tensor DARE processes at once (per task: 256 KiB in float32): peft's masks, rescaling and sign
# election make temporaries several times the size of their input, so a large tensor goes through in blocks.
DARE_BLOCK_ELEMENTS = 1 << 16


def _dare(merge: Callable, pretrained, task_vectors, scaling: float, density: float, seed: int, **kwargs):
    """`theta_0 + merge(tensors, weights=scaling, density)` per tensor, `merge` one of peft's DARE merges (its steps
    are elementwise across the tasks), applied to blocks of `DARE_BLOCK_ELEMENTS` entries in order. peft draws the
    random masks with torch's global generator: it is seeded once per tensor (`dare_seed`) inside a fork, so the
    caller's random state is left as it was and the masks do not depend on the order the tensors are merged in."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density (the fraction of each task vector kept) must be in (0, 1], got {density}.")
    delta = {}
    for key in task_vectors[0]:
        flat = [tv[key].float().reshape(-1) for tv in task_vectors]
        device = flat[0].device
        weights = torch.full((len(flat),), float(scaling), device=device)
        merged = torch.empty_like(flat[0])
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            torch.manual_seed(dare_seed(seed, key))
            with warnings.catch_warnings():
                # density 1 keeps every entry: peft warns "no pruning will be performed" once per block.
                warnings.filterwarnings("ignore", message="The density .* no pruning")
                for start in range(0, merged.numel(), DARE_BLOCK_ELEMENTS):
                    stop = start + DARE_BLOCK_ELEMENTS
                    merged[start:stop] = merge([tensor[start:stop] for tensor in flat], weights, density, **kwargs)
        delta[key] = merged.reshape(task_vectors[0][key].shape)
    return add_to_pretrained(pretrained, delta)


def dare_linear(
    pretrained: StateDict, task_vectors: Sequence[StateDict], scaling: float = 0.3, density: float = 0.5, seed: int = 0
) -> StateDict:
    """DARE with task arithmetic: theta_0 + scaling * sum_i DARE(tau_i).

    DARE (Yu et al., 2024, "Language Models are Super Mario"): each entry of each task vector is kept with
    probability `density` (dropped with p = 1 - density) and the kept ones are rescaled by 1 / density, so every
    task vector keeps its expected value. Computed by peft's `dare_linear` (`peft.utils.merge_utils`; weights all
    `scaling`) on blocks of entries, the masks drawn per tensor from `seed` and the tensor's name (`dare_seed`).
    """
    from peft.utils.merge_utils import dare_linear as peft_dare_linear

    return _dare(peft_dare_linear, pretrained, task_vectors, scaling, density, seed)


def dare_ties(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    scaling: float = 0.3,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: typing.Literal["total", "frequency"] = "total",
) -> StateDict:
    """DARE, then TIES' sign election and disjoint mean: theta_0 + dare_ties(tau) as peft computes it.

    Each task vector is sparsified as in [`dare_linear`] (random drop and rescale instead of TIES' magnitude trim);
    each entry's sign is elected per tensor (`majority_sign_method`: `total`, the sign of the summed values, or
    `frequency`, of the signs; a zero sum elects +), and the values agreeing with it, each times `scaling`, are
    averaged. Computed by peft's `dare_ties` (`peft.utils.merge_utils`), masks as in `dare_linear`.
    """
    from peft.utils.merge_utils import dare_ties as peft_dare_ties

    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    return _dare(
        peft_dare_ties, pretrained, task_vectors, scaling, density, seed, majority_sign_method=majority_sign_method
    )


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: `fn(pretrained, task_vectors, **options) -> merged state dict`.

    How `merge_clip_vision` runs it on checkpoints without holding them (see `streamed_merge`): `per_tensor`
    methods (each merged tensor depends only on that tensor of the inputs) are called one tensor at a time;
    `streamed(source, **options)` is a method's own streamed form (TIES: its whole-vector threshold and majority
    sign take passes over the inputs first); a method with neither gets every task vector in memory at once.

    `trained_by`: for a method whose options are learned from data (AdaMerging's coefficients), how they are learned
    and by which command; `hf-moe merge`, a static merge, refuses such a method with that message."""

    name: str
    fn: Callable[..., StateDict]
    description: str
    per_tensor: bool = False
    streamed: Callable[..., Callable[[str], torch.Tensor]] | None = None
    trained_by: str | None = None

    def options(self) -> dict:
        """The method's options and their defaults."""
        parameters = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p.default for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def check_options(self, options: dict) -> None:
        """Refuse an option the method does not have, and a NaN or infinite one, naming it."""
        check_finite_options(options, f"Merge method '{self.name}' option")
        signature = inspect.signature(self.fn)
        if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            accepted = ", ".join(self.options()) or "none"
            raise ValueError(f"Merge method '{self.name}' has no option {unknown[0]!r} (its options: {accepted}).")


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    fn: Callable | None = None,
    *,
    description: str | None = None,
    overwrite=False,
    per_tensor: bool = False,
    streamed: Callable | None = None,
    trained_by: str | None = None,
):
    """Register `fn(pretrained, task_vectors, **options)` as merge method `name` (usable as a decorator). A trained
    method registers the function that applies its learned parameters (passed as options), with `trained_by`
    saying how and by which command they are learned. `per_tensor=True` declares that each merged tensor depends
    only on the same tensor of the inputs, so checkpoints are merged a tensor at a time; `streamed` gives a streamed
    form of a method that is not (see `MergeMethod`)."""

    def register(fn):
        if name in MERGE_METHODS and not overwrite:
            raise ValueError(f"Merge method '{name}' is already registered; pass overwrite=True to replace it.")
        text = description or (inspect.getdoc(fn) or name).split("\n")[0]
        MERGE_METHODS[name] = MergeMethod(
            name, fn, text, per_tensor=per_tensor, streamed=streamed, trained_by=trained_by
        )
        return fn

    return register(fn) if fn is not None else register


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


# --------------------------------------------------------------------------------------------- streamed merging


class MagnitudeSelection:
    """The exact k-th smallest |value| (what `torch.kthvalue` returns on the concatenation) of float32 tensors seen
    one at a time, in two passes over them, with 65536 counters in memory instead of the values.

    |value| of a float32 is non-negative, and non-negative floats order as their bit patterns read as int32 (NaN
    last, as kthvalue orders it): the first pass counts the values by the high 16 bits of that pattern and finds
    the bin holding the k-th; the second counts the values of that bin by their low 16 bits, which gives the exact
    pattern. Feed the same tensors (any order, any split) to both passes:

        selection = MagnitudeSelection(k)
        while not selection.done:
            for tensor in tensors():
                selection.add(tensor)
            selection.end_pass()
        selection.value  # a 0-d float32 tensor
    """

    BINS = 1 << 16
    BLOCK = 1 << 18

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        self.k, self.high, self.value = k, None, None
        self.counts = torch.zeros(self.BINS, dtype=torch.int64)

    @property
    def done(self) -> bool:
        return self.value is not None

    def add(self, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), self.BLOCK):  # bounded temporaries, whatever the tensor's size
            bits = flat[start : start + self.BLOCK].to(torch.float32).abs().view(torch.int32)
            if self.high is None:
                self.counts += torch.bincount(bits >> 16, minlength=self.BINS)
            else:
                self.counts += torch.bincount(bits[(bits >> 16) == self.high] & 0xFFFF, minlength=self.BINS)

    def end_pass(self) -> None:
        cumulative = self.counts.cumsum(0)
        if self.k > int(cumulative[-1]):
            raise ValueError(f"Asked for the {self.k}-th smallest of {int(cumulative[-1])} values.")
        index = int(torch.searchsorted(cumulative, torch.tensor(self.k)))  # the first bin reaching k
        below = int(cumulative[index - 1]) if index else 0
        self.counts.zero_()
        if self.high is None:
            self.high, self.k = index, self.k - below
        else:
            self.value = torch.tensor([(self.high << 16) | index], dtype=torch.int32).view(torch.float32)[0]


class TaskVectorSource:
    """The pretrained state dict and the task vectors of its fine-tunes as a streamed merge reads them: one tensor
    at a time, by key. Subclasses implement `pretrained(key)` (floating tensors in float32) and
    `task_vector(i, key)` (float32, fine-tuned minus pretrained); `keys` are the task vectors' keys (the floating
    tensors, in state-dict order) and `num_tasks` their number."""

    keys: list[str]
    num_tasks: int

    def pretrained(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def task_vector(self, index: int, key: str) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, key: str) -> torch.Size:
        return self.pretrained(key).shape


class StateDictSource(TaskVectorSource):
    """A `TaskVectorSource` over state dicts in memory (tests, and what the streamed forms must reproduce)."""

    def __init__(self, pretrained: StateDict, finetuned: Sequence[StateDict]):
        check_compatible(pretrained, finetuned)
        check_finite_state_dicts(
            [pretrained, *finetuned], input_labels("pretrained", [f"finetuned[{i}]" for i in range(len(finetuned))])
        )
        self._pretrained, self._finetuned = pretrained, list(finetuned)
        self.keys = [key for key, tensor in pretrained.items() if tensor.is_floating_point()]
        self.num_tasks = len(self._finetuned)

    def pretrained(self, key):
        return self._pretrained[key].float()

    def task_vector(self, index, key):
        return self._finetuned[index][key].float() - self._pretrained[key].float()


class _OneTaskVectorTensor(Mapping):
    """`{key: task vector i at key}`, computed when read and not kept: what a per-tensor method gets."""

    def __init__(self, source: TaskVectorSource, index: int, key: str):
        self.source, self.index, self.key = source, index, key

    def __getitem__(self, key):
        if key != self.key:
            raise KeyError(key)
        return self.source.task_vector(self.index, key)

    def __iter__(self):
        return iter((self.key,))

    def __len__(self):
        return 1


# Entries of a tensor the streamed TIES processes at once (per task: 256 KiB in float32): its elementwise steps
# make temporaries several times the size of their input.
TIES_BLOCK_ELEMENTS = 1 << 16


def ties_streamed(
    source: TaskVectorSource,
    scaling: float = 0.3,
    density: float = 0.2,
    trim: str = "task_vector",
    aggregation: typing.Literal["sum", "mean"] = "sum",
) -> Callable[[str], torch.Tensor]:
    """[`ties`] on a `TaskVectorSource`, equal to it bit for bit, with a few tensors in memory at a time: the
    whole-vector trim thresholds take two passes over the task vectors ([`MagnitudeSelection`], the exact
    `kthvalue` of `trim_task_vector`), the majority sign one more; returns `merged(key)` (float32, computed
    when called: one more pass as the output is written)."""
    if aggregation not in TIES_AGGREGATIONS:
        raise ValueError(f"ties aggregation must be one of {TIES_AGGREGATIONS}, got {aggregation!r}.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density (the fraction of each task vector kept) must be in (0, 1], got {density}.")
    if density < 1.0 and trim not in ("task_vector", "tensor"):
        raise ValueError(f"trim scope must be 'task_vector' or 'tensor', got {trim!r}.")
    thresholds = None
    if density < 1.0 and trim == "task_vector":
        size = sum(source.shape(key).numel() for key in source.keys)
        selections = [MagnitudeSelection(size - int(density * size)) for _ in range(source.num_tasks)]
        while not selections[0].done:
            for key in source.keys:
                for index, selection in enumerate(selections):
                    selection.add(source.task_vector(index, key))
                release_free_memory()
            for selection in selections:
                selection.end_pass()
        thresholds = [selection.value for selection in selections]

    def trimmed(index: int, key: str) -> torch.Tensor:
        tensor = source.task_vector(index, key)
        if density == 1.0:
            return tensor
        if thresholds is None:
            return trim_task_vector({key: tensor}, density, trim)[key]
        return trim_to_threshold(tensor, thresholds[index])

    def stacked(key: str) -> torch.Tensor:
        # `[tasks, entries]`, filled task by task (no list of tensors beside the stack).
        values = torch.empty(source.num_tasks, source.shape(key).numel())
        for index in range(source.num_tasks):
            values[index] = trimmed(index, key).reshape(-1)
        return values

    def blocks(values: torch.Tensor):
        # TIES' elementwise steps make temporaries several times what they process: large tensors go through in
        # blocks of entries, each a contiguous `[tasks, block]` (the same per-entry sums over the tasks).
        size = values.shape[1]
        for start in range(0, size, TIES_BLOCK_ELEMENTS):
            stop = min(start + TIES_BLOCK_ELEMENTS, size)
            yield start, stop, values[:, start:stop] if size <= TIES_BLOCK_ELEMENTS else values[:, start:stop].clone()

    def elected_sign_sum(key: str) -> torch.Tensor:
        values = stacked(key)
        mass = torch.empty(values.shape[1])
        for start, stop, block in blocks(values):
            mass[start:stop] = block.sum(dim=0)
        del values
        release_free_memory()
        return mass.sign().sum()  # = ties_elected_sign_sum(values)

    elected_total = sum(elected_sign_sum(key) for key in source.keys)
    majority = torch.sign(torch.as_tensor(elected_total, dtype=torch.float32))

    def merged(key: str) -> torch.Tensor:
        values = stacked(key)
        delta = torch.empty(values.shape[1])
        for start, stop, block in blocks(values):
            delta[start:stop] = ties_disjoint_merge(block, majority, scaling, aggregation)
        del values
        release_free_memory()
        delta = delta.reshape(source.shape(key))
        return add_to_pretrained({key: source.pretrained(key)}, {key: delta})[key]

    return merged


register_merge_method("average", average, per_tensor=True)
register_merge_method("task_arithmetic", task_arithmetic, per_tensor=True)
register_merge_method("ties", ties, streamed=ties_streamed)
# DARE's masks and TIES-like sign election are per tensor in peft's form, and each tensor's masks have their own seed.
register_merge_method("dare_linear", dare_linear, per_tensor=True)
register_merge_method("dare_ties", dare_ties, per_tensor=True)
ADAMERGING_TRAINING = (
    "AdaMerging's coefficients (one per tensor and task) are trained by entropy minimisation on unlabeled test "
    "images of each task, so it is not a static merge: run `hf-moe adamerging --base BASE --finetuned FINETUNED "
    "[FINETUNED ...] --tasks TASK_DIR [TASK_DIR ...] --output_dir DIR`, which trains them and writes the merged model "
    "with its coefficients"
)
register_merge_method("adamerging", adamerging_merge, per_tensor=True, trained_by=ADAMERGING_TRAINING)


def streamed_merge(method: str, source: TaskVectorSource, **options) -> Callable[[str], torch.Tensor]:
    """Merge the task vectors of `source` with the registered `method`, reading them a tensor at a time where
    the method allows it: returns `merged(key)`, the merged float32 tensor of each of `source.keys` (exactly what
    `method` computes on the whole state dicts), to be called once per key. Passes over the inputs that the
    method needs first (TIES' thresholds) are made before it returns."""
    merge = get_merge_method(method)
    merge.check_options(options)
    if merge.streamed is not None:
        return merge.streamed(source, **options)
    if merge.per_tensor:

        def merged(key: str) -> torch.Tensor:
            task_vectors = [_OneTaskVectorTensor(source, index, key) for index in range(source.num_tasks)]
            return merge.fn({key: source.pretrained(key)}, task_vectors, **options)[key]

        return merged
    logger.warning(
        f"Merge method '{method}' is registered without a streamed form (per_tensor or streamed): all "
        f"{source.num_tasks} task vectors are held in memory at once."
    )
    pretrained = {key: source.pretrained(key) for key in source.keys}
    task_vectors = [{key: source.task_vector(i, key) for key in source.keys} for i in range(source.num_tasks)]
    result = merge.fn(pretrained, task_vectors, **options)
    del task_vectors
    return result.pop


# --------------------------------------------------------------------------------------------- CLIP checkpoints


# What `clip_vision_kind` says the merge commands take.
MERGE_INPUT_ROLE = "merging (hf-moe merge, merge-wemoe, adamerging) of dense CLIPModel / CLIPVisionModel inputs"


def clip_vision_kind(name_or_path: str | Path, role: str = MERGE_INPUT_ROLE) -> tuple[str, object]:
    """("CLIPModel" | "CLIPVisionModel", config) of a Hub id or folder; anything else refused, naming it (an hf-moe
    model by its family: a WEMoE or CLIP-MoE read as a plain CLIP would lose its routers and experts)."""
    config = load_config(name_or_path, require_moe=False)
    check_model_type(config, name_or_path, VISION_MODEL_TYPES, role)
    return VISION_MODEL_TYPES[config.model_type], config


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
    check_finite_state_dicts([base_state, *finetuned_states], input_labels(pretrained, finetuned))
    return base_model, base_state, finetuned_states


class CLIPCheckpoint:
    """A `CLIPModel` / `CLIPVisionModel` (`...WithProjection`) checkpoint read one tensor at a time: `kind`,
    `config`, the class `load_clip_vision` loads it as (`model_class`), its tensors' names and shapes as that class
    has them (`specs`, checked against the checkpoint's headers on opening: a missing tensor or a shape that does
    not fit is refused, naming it; extra entries, such as old `position_ids` buffers, are ignored as
    `from_pretrained` ignores them) and `dtype`, the dtype `from_pretrained` loads it in, which `get` returns.
    The vision tower's keys (`vision_keys`, as in `load_clip_vision`'s state dict) are the names under `prefix`
    (`vision_model.`, or none for a transformers 5 `CLIPVisionModel`)."""

    def __init__(self, name_or_path: str | Path, label: str | None = None):
        from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

        from .checkpoint_io import (
            LazyCheckpoint,
            check_checkpoint_fits,
            checkpoint_dtype,
            loading_key_mapping,
            planned_state_dict,
        )

        self.name_or_path = name_or_path
        self.kind, self.config = clip_vision_kind(name_or_path)
        if self.kind == "CLIPModel":
            self.model_class = CLIPModel
        elif "CLIPVisionModelWithProjection" in (self.config.architectures or []):
            self.model_class = CLIPVisionModelWithProjection
        else:
            self.model_class = CLIPVisionModel
        with torch.device("meta"):
            model = self.model_class(self.config)
        self.specs = planned_state_dict(model)
        tower = vision_tower_module(model)
        # The tower's names in the model: `vision_model.*` (CLIPModel, ...WithProjection), or the model's own.
        self.prefix = next(f"{name}." if name else "" for name, module in model.named_modules() if module is tower)
        # Names as `from_pretrained` maps them (a transformers 4 CLIPVisionModel has a `vision_model.` prefix).
        # `get` refuses a NaN or inf tensor, naming `label` and the tensor.
        self.checkpoint = LazyCheckpoint(name_or_path, key_mapping=loading_key_mapping(model), label=label)
        check_checkpoint_fits(self.checkpoint, self.specs, name_or_path, self.kind)
        self.dtype = checkpoint_dtype(self.config, self.checkpoint)
        tower_names = set(tower.state_dict())
        self.vision_keys = [
            name[len(self.prefix) :]
            for name in self.specs
            if name.startswith(self.prefix) and name[len(self.prefix) :] in tower_names
        ]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` (a name of `specs`) as `from_pretrained` loads it (floating ones in `dtype`)."""
        tensor = self.checkpoint.get(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def vision(self, key: str) -> torch.Tensor:
        return self.get(self.prefix + key)

    def vision_specs(self) -> StateDict:
        """The vision tower's keys -> meta tensors (floating) or their values (integer buffers, small), for
        `check_compatible`."""
        specs = {key: self.specs[self.prefix + key] for key in self.vision_keys}
        return {key: spec if spec.is_floating_point() else self.vision(key) for key, spec in specs.items()}

    def close(self) -> None:
        self.checkpoint.close()


class CheckpointTaskVectors(TaskVectorSource):
    """The vision towers of a pretrained CLIP checkpoint and of its fine-tunes as a `TaskVectorSource`: each task
    vector tensor is read and computed on demand (fine-tuned minus pretrained, in float32, each side first in
    the dtype `from_pretrained` loads it in, so exactly `task_vector` of the loaded state dicts)."""

    def __init__(self, pretrained: CLIPCheckpoint, finetuned: Sequence[CLIPCheckpoint]):
        self.base, self.finetuned = pretrained, list(finetuned)
        self.num_tasks = len(self.finetuned)
        specs = pretrained.vision_specs()
        self.keys = [key for key, spec in specs.items() if spec.is_floating_point()]
        self._cached = (None, None)  # the last pretrained tensor read: N task vectors of one key read it once

    def pretrained(self, key: str) -> torch.Tensor:
        if self._cached[0] != key:
            self._cached = (None, None)
            self._cached = (key, self.base.vision(key).float())
        return self._cached[1]

    def task_vector(self, index: int, key: str) -> torch.Tensor:
        return self.finetuned[index].vision(key).float() - self.pretrained(key)

    def shape(self, key: str) -> torch.Size:
        return self.base.specs[self.base.prefix + key].shape

    def warn_identical(self) -> None:
        """After a merge read every tensor: warn about fine-tunes equal to the pretrained model or to each other
        (`warn_identical_inputs`), by the sums their reads recorded (`LazyCheckpoint.sums`: no extra pass)."""

        def read_sums(checkpoint):
            sums = checkpoint.checkpoint.sums
            names = [checkpoint.prefix + key for key in self.keys]
            return {key: sums[name] for key, name in zip(self.keys, names)} if all(n in sums for n in names) else None

        names = [self.base.name_or_path, *(checkpoint.name_or_path for checkpoint in self.finetuned)]
        pretrained = read_sums(self.base)
        if pretrained is not None:
            warn_identical_inputs(pretrained, [read_sums(checkpoint) for checkpoint in self.finetuned], names)


def open_for_merge(pretrained: str | Path, finetuned: Sequence[str | Path]):
    """`load_for_merge` without loading: the configs checked (same vision architecture), then the checkpoints
    opened (`CLIPCheckpoint`: names and shapes from the headers) and their vision towers compared
    (`check_compatible`, naming the first bad key; integer buffers are read and compared). Returns
    (pretrained checkpoint, fine-tuned checkpoints); close them when done."""
    if not finetuned:
        raise ValueError("Merging needs at least one FINETUNED model.")
    names = [str(pretrained), *map(str, finetuned)]
    configs = [clip_vision_kind(name)[1] for name in [pretrained, *finetuned]]
    check_same_architecture(configs, names)
    opened = []
    try:
        for name, label in zip([pretrained, *finetuned], input_labels(pretrained, finetuned)):
            opened.append(CLIPCheckpoint(name, label=label))
        check_compatible(opened[0].vision_specs(), [checkpoint.vision_specs() for checkpoint in opened[1:]], names)
    except BaseException:
        for checkpoint in opened:
            checkpoint.close()
        raise
    return opened[0], opened[1:]


# The card snippet of a merged `CLIPVisionModel`: an ordinary transformers model, its features for an image.
VISION_USAGE = Usage(
    model_class="CLIPVisionModel",
    processor_class="AutoImageProcessor",
    model_remote_code=False,
    processor_remote_code=False,
    pipeline=False,
    body=(
        "with torch.no_grad():",
        '    features = model(**processor(images=image, return_tensors="pt")).pooler_output',
        "print(features.shape)",
    ),
)


def merge_command_line(method: str, pretrained, finetuned, output_dir, options: dict) -> str:
    """The `hf-moe merge` command line that makes this merge (each option is the flag of its name)."""
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
        parts += [f"--{key}", str(value)]
    return " ".join(parts)


@hub_keywords
def merge_clip_vision(
    method: str,
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    return_model: bool = True,
    hub: HubArguments | None = None,
    **options,
):
    """Merge fine-tuned dense CLIP vision towers (CLIPModel / CLIPVisionModel; hf-moe models refused) into one.

    Merges the vision towers of `finetuned` (fine-tunes of `pretrained`) with the registered merge `method` and
    writes the result to `output_dir` (atomically, with the processor of `pretrained` and a model card).

    The checkpoints are read one tensor at a time and the output written tensor by tensor (`hf_moe.checkpoint_io`,
    `streamed_merge`): memory holds one tensor of each input at a time, never the models (a method registered
    without a streamed form holds its task vectors, with a warning).

    Args:
        method: A name in `MERGE_METHODS` (`average`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
            `adamerging` with its learned `coefficients`, or one registered later).
        pretrained: Hub id or folder of a `CLIPModel` or `CLIPVisionModel`. A `CLIPModel` gives a `CLIPModel`
            output (its text tower, projections and logit scale kept), a vision model a `CLIPVisionModel`.
        finetuned: Hub ids or folders of fine-tunes of `pretrained` (`CLIPModel` or `CLIPVisionModel`; only their
            vision towers are used). NaN or inf in any tensor read is refused, naming the input and tensor
            (nothing is written); a fine-tune given twice or equal to `pretrained` is warned about.
        output_dir: New or empty folder (`overwrite=True` replaces a non-empty one); may not hold an input.
        dtype: Dtype of the written weights: "auto" (that of `pretrained`, as `from_pretrained` loads it),
            "float32", "bfloat16" or "float16". The merge itself is computed in float32 per tensor.
        max_shard_size: Larger outputs are written as shards of at most this size with an index.
        return_model: Load the written model and return it; False returns None (the command line's choice).
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's, default the base models' own where their
            cards state one). Default: no push.
        options: The method's options (`scaling`, `density`, `trim`, `aggregation`, `seed`, ...), checked by name first.

    Returns:
        The merged model, loaded from `output_dir` (None when `return_model=False`).
    """
    from .checkpoint_io import StreamedModel, resolve_dtype

    merge = get_merge_method(method)
    merge.check_options(options)
    resolve_dtype(dtype, torch.float32)  # an unknown name is refused before any work
    finetuned = list(finetuned)
    inputs = [pretrained, *finetuned]
    hub = check_destination(output_dir, overwrite, inputs, hub)
    warn_input_mistakes(pretrained, finetuned)

    base, finetuned_checkpoints = open_for_merge(pretrained, finetuned)
    try:
        output_dtype = resolve_dtype(dtype, base.dtype)
        source = CheckpointTaskVectors(base, finetuned_checkpoints)
        merged = streamed_merge(method, source, **options)
        merged_keys = set(source.keys)
        with torch.device("meta"):
            model = base.model_class(base.config)
        model = model.to(output_dtype).eval()
        # What loading the pretrained model in that dtype records (`from_pretrained` sets the sub-configs' too).
        for config in [model.config, *(getattr(model.config, key) for key in model.config.sub_configs)]:
            if config is not None:
                config.dtype = output_dtype
        model.config.name_or_path = ""
        is_clip = model.config.model_type == "clip"

        def produce(name: str) -> torch.Tensor:
            key = name[len(base.prefix) :] if name.startswith(base.prefix) else None
            if key in merged_keys:
                tensor = merged(key)
                # As `add_to_pretrained` rounds: to the pretrained dtype (then to another one if asked).
                return tensor.to(base.dtype if dtype in (None, "auto") else output_dtype)
            tensor = base.get(name)
            return tensor.to(output_dtype) if tensor.is_floating_point() else tensor

        write_model(
            StreamedModel(model, produce, max_shard_size=max_shard_size),
            output_dir,
            card=merge_card(method, pretrained, finetuned, output_dir, options, dtype, is_clip),
            processor=load_processor(pretrained),
            hub=hub,
            overwrite=overwrite,
            inputs=inputs,
        )
        source.warn_identical()
    finally:
        for checkpoint in [base, *finetuned_checkpoints]:
            checkpoint.close()
    logger.info(f"Saved the {method} merge of {len(finetuned)} model(s) to {output_dir}")
    return base.model_class.from_pretrained(output_dir).eval() if return_model else None


def merge_card(
    method: str, pretrained, finetuned: list, output_dir, options: dict, dtype: str, is_clip: bool
) -> CardSpec:
    """The card of a merged model: the method and its options, the fine-tunes and the command line that merges them."""
    merge = get_merge_method(method)
    listed = "\n".join(f"{i}. `{name}`" for i, name in enumerate(finetuned))
    shown = {**merge.options(), **options}
    command_options = {**options, **({} if dtype in (None, "auto") else {"dtype": dtype})}
    how_built = (
        f"**{method}** merge ({merge.description}) of the vision towers of {len(finetuned)} fine-tuned model(s) "
        f"of `{pretrained}`, built with `hf_moe.merging`"
        + (" (text tower, projections and logit scale from the pretrained model)" if is_clip else "")
        + ".\n\nFine-tuned models:\n\n"
        + listed
        + "\n\nOptions: "
        + (", ".join(f"`{k}={v}`" for k, v in shown.items()) or "none")
        + f"\n\n```bash\n{merge_command_line(method, pretrained, finetuned, output_dir, command_options)}\n```"
    )
    return CardSpec(
        base_model=[str(pretrained), *map(str, finetuned)],
        how_built=how_built,
        tags=("merge", "model-merging", method, "clip"),
        description=(
            f"A dense CLIP{'' if is_clip else ' vision model'} merged from fine-tuned models by {method} with "
            "[hf-moe](https://github.com/hf-moe/hf-moe): an ordinary transformers model, no remote code needed."
        ),
        pipeline_tag="zero-shot-image-classification" if is_clip else "image-feature-extraction",
        usage=None if is_clip else VISION_USAGE,
    )


# --------------------------------------------------------------------------------------------- `hf-moe merge`

# The help of each merge option on `hf-moe merge`, and the older flag names it keeps. The flags themselves (names,
# types, choices, defaults per method) come from the registered methods' signatures (`merge_option_fields`); an
# option missing here gets a generic help.
MERGE_OPTION_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "scaling": ("lambda: theta_0 + lambda * the merged task vectors.", ()),
    "density": (
        "Fraction of each task vector kept: the largest by magnitude (ties), or a random draw whose kept entries are "
        "rescaled by 1 / density (dare_linear, dare_ties).",
        ("--ties_density", "--ties-density"),
    ),
    "trim": (
        "ties: trim over the whole task vector (task_vector) or per tensor (tensor).",
        ("--ties_trim", "--ties-trim"),
    ),
    "aggregation": (
        "ties: disjoint aggregation of the sign-agreeing trimmed values, sum (fusion_bench's default and the dis-sum "
        "of the AdaMerging / WEMoE TIES baselines) or mean (the TIES paper's dis-mean, peft's ties).",
        ("--ties_aggregation", "--ties-aggregation"),
    ),
    "seed": ("Seed of the random drop masks (each tensor's masks are drawn from it and the tensor's name).", ()),
    "majority_sign_method": (
        "How the sign of each entry is elected: total (of the summed values) or frequency (of the signs), as peft.",
        (),
    ),
}
# The option types a flag can carry; a method option of another type (AdaMerging's coefficient dict) has no flag.
FLAG_TYPES = (float, int, str, bool)


def static_merge_methods() -> dict[str, MergeMethod]:
    """The registered methods `hf-moe merge` runs: all but those whose options are trained (`trained_by`)."""
    return {name: method for name, method in MERGE_METHODS.items() if method.trained_by is None}


def merge_option_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """The `hf-moe merge` option fields (for `dataclasses.make_dataclass`): one per option of the static merge
    methods, in the order the methods and their signatures name them, typed as the signature types it (a Literal
    gives choices), default None (the method's own default applies), its help from `MERGE_OPTION_HELP` with the
    methods that take it and their defaults."""
    found: dict[str, dict] = {}
    for name, method in static_merge_methods().items():
        hints = typing.get_type_hints(method.fn)
        for option, default in method.options().items():
            annotation = hints.get(option, type(default))
            literal = typing.get_origin(annotation) is typing.Literal
            if not literal and annotation not in FLAG_TYPES:
                continue
            entry = found.setdefault(option, {"annotation": annotation, "defaults": {}})
            if entry["annotation"] != annotation:
                raise TypeError(
                    f"Merge option '{option}' is {entry['annotation']} in one method and {annotation} in '{name}': one "
                    "flag cannot carry both; rename one."
                )
            entry["defaults"][name] = default
    fields = []
    for option, entry in found.items():
        text, aliases = MERGE_OPTION_HELP.get(option, (f"Option '{option}' of the merge method.", ()))
        by_default: dict = {}
        for name, default in entry["defaults"].items():
            by_default.setdefault(default, []).append(name)
        defaults = "; ".join(f"{', '.join(names)}: {default}" for default, names in by_default.items())
        metadata = {"help": f"{text} ({defaults})", **({"aliases": list(aliases)} if aliases else {})}
        fields.append((option, entry["annotation"] | None, dataclasses.field(default=None, metadata=metadata)))
    return fields


def merge_arguments_class() -> type:
    """The options dataclass of `hf-moe merge`: the method, the output, the method options (`merge_option_fields`:
    built from the registry when the command runs, so a method registered before has its flags) and the dtype."""
    from .checkpoint_io import DTYPE_CHOICES

    static = ", ".join(static_merge_methods())
    trained = ", ".join(f"{name} (trained: `hf-moe {name}`)" for name, m in MERGE_METHODS.items() if m.trained_by)
    method_help = f"Merge method: {static}" + (f"; not here: {trained}" if trained else "") + "."
    head = [
        ("method", str, dataclasses.field(metadata={"help": method_help})),
        (
            "output_dir",
            str,
            dataclasses.field(metadata={"help": "Folder to write the merged model to (must be new or empty)."}),
        ),
    ]
    tail = [
        (
            "dtype",
            str,
            dataclasses.field(
                default="auto",
                metadata={
                    "help": "Dtype of the written weights (default: BASE's); the merge is computed in float32 per "
                    "tensor.",
                    "choices": list(DTYPE_CHOICES),
                },
            ),
        ),
        (
            "max_shard_size",
            str,
            dataclasses.field(default="5GB", metadata={"help": "Shard the weights above this size (with an index)."}),
        ),
        ("overwrite", bool, dataclasses.field(default=False, metadata={"help": "Replace a non-empty output_dir."})),
    ]
    return dataclasses.make_dataclass("MergeArguments", [*head, *merge_option_fields(), *tail])


def merge_command(argv: list[str]) -> None:
    """`hf-moe merge`: `merge_clip_vision` from the command line."""
    from transformers import HfArgumentParser

    from .arguments import HubArguments, parse_command_line

    parser = HfArgumentParser(
        (merge_arguments_class(), HubArguments),
        prog="hf-moe merge",
        description=merge_clip_vision.__doc__.split("\n")[0],
    )
    parser.add_argument("pretrained", metavar="BASE", help="Pretrained CLIP (Hub id or folder).")
    parser.add_argument("finetuned", nargs="+", metavar="FINETUNED", help="Fine-tunes of BASE.")
    args, hub_args, positional = parse_command_line(parser, argv)
    method = get_merge_method(args.method)
    if method.trained_by is not None:
        raise ValueError(f"Merge method '{args.method}': {method.trained_by}.")
    options = {name: getattr(args, name) for name, *_ in merge_option_fields() if getattr(args, name) is not None}
    merge_clip_vision(
        args.method,
        positional.pretrained,
        positional.finetuned,
        args.output_dir,
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        return_model=False,
        hub=hub_args,
        **options,
    )
    print(f"Merged {len(positional.finetuned)} model(s) by {args.method} into {args.output_dir}")

"""Checkpoints read and written one tensor at a time, so that a converter holds about one tensor of its output in
memory instead of the dense models and their MoE copy (mergekit's lazy loading, in three parts).

1. `LazyCheckpoint` reads the weights of a model folder, a Hub id or a single weights file (safetensors, with or
   without an index; `.bin` / `.pt` pickles) by name: shapes and dtypes from the headers, each tensor read on demand
   into memory of its own. Safetensors are read with `readinto` (no memory map, so nothing but the tensor counts in
   resident memory); zip pickles are memory-mapped and re-opened every `max_mapped_bytes`, so the pages touched stay
   bounded.
2. `build_on_meta` constructs a model on the meta device and still gives, for any parameter, exactly the value a CPU
   construction under the same seed would have given: every random initialisation runs on a scratch CPU tensor of
   the same shape, so the global RNG advances exactly as before, and a parameter's value is re-created on demand by
   replaying its initialisation from the RNG state recorded before it. Converters use it for random routers.
3. `StreamedModel` pairs that meta model with a function producing each output tensor; its `save_pretrained` writes
   what `PreTrainedModel.save_pretrained` writes (config, generation config, remote-code files, tied weights left
   out), but the safetensors shards are written tensor by tensor (`write_safetensors_shards`): memory never holds
   more than the tensor being written (plus what producing it reads), whatever the shard size.
   `hf_moe.publish.write_model` takes a `StreamedModel` as it takes a model.

    torch.manual_seed(seed)
    model, initial_value = build_on_meta(lambda: CLIPMoEModel(config))
    model.to(torch.bfloat16)  # output dtype: meta tensors, so free
    routers = {name: initial_value(name) for name in planned_state_dict(model) if name.endswith("router.weight")}
    with LazyCheckpoint("openai/clip-vit-large-patch14") as dense:
        def produce(name):  # called once per output tensor, in the order of `planned_state_dict(model)`
            return routers[name] if name in routers else dense.get(name)
        write_model(StreamedModel(model, produce), output_dir, processor=processor)
"""

import json
import math
import os
import struct
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.utils import logging

from .loading import read_safetensors_header


logger = logging.get_logger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names (the format's spec) <-> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# `--dtype` choices of the converters.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | torch.dtype | None, input_dtype: torch.dtype) -> torch.dtype:
    """The output dtype of a converter: `input_dtype` for None / "auto", else the named one ("bfloat16", ...)."""
    if dtype is None or dtype == "auto":
        return input_dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}.")
    return getattr(torch, dtype)


def checkpoint_dtype(config, checkpoint: "LazyCheckpoint") -> torch.dtype:
    """The dtype `from_pretrained(..., dtype="auto")` (transformers' default) loads a checkpoint in: the config's
    `dtype` when set, else that of its first floating-point tensor (float32 if it has none)."""
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    for name in checkpoint.names():
        if checkpoint.dtype(name).is_floating_point:
            return checkpoint.dtype(name)
    return torch.get_default_dtype()


# ---- finiteness: NaN / inf never reach a written model -----------------------------------------------------------


class NonFiniteError(ValueError):
    """A NaN or infinite value in a converter's or merger's input tensor or option: saved, it would silently make
    every output of the model NaN."""


def tensor_sum(tensor: torch.Tensor) -> float | None:
    """The sum of a floating tensor (in its dtype, as `Tensor.sum`: no temporary), None for other dtypes. NaN or inf
    when any value is; also a cheap fingerprint: two tensors of equal sums in every key are, for weights, the same
    checkpoint to any practical certainty."""
    if not tensor.is_floating_point():
        return None
    flat = tensor.detach().reshape(-1)
    if flat.element_size() == 1:  # float8: no sum / isfinite kernels on the CPU
        flat = flat.float()
    return float(flat.sum())


def non_finite_counts(tensor: torch.Tensor, total: float | None = None) -> tuple[int, int] | None:
    """(NaN count, inf count) of a floating tensor, or None when every value is finite (always for other dtypes).

    A sum (`total`, its `tensor_sum` when already known) is NaN or inf when any value is, and costs a fraction of
    `isfinite`: the exact count runs only when the sum is not finite, which finite values do only by overflowing
    (then it finds nothing)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if math.isfinite(tensor_sum(tensor) if total is None else total):
        return None
    flat = tensor.detach().reshape(-1)
    if flat.element_size() == 1:
        flat = flat.float()
    nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    return (nan, inf) if nan or inf else None


def check_finite(tensor: torch.Tensor, name: str, source: str, total: float | None = None) -> None:
    """Refuse, naming `source` (e.g. "fine-tune 2 of 3 ('path')") and the tensor `name`, a tensor holding NaN or
    inf values (`total`: its `tensor_sum`, when already known)."""
    counts = non_finite_counts(tensor, total)
    if counts is not None:
        raise NonFiniteError(
            f"{source}: {name} holds {counts[0]} NaN / {counts[1]} inf values; a model built from it would carry "
            "them. Re-create or repair that checkpoint (nothing was written)."
        )


def check_finite_options(options: dict, what: str = "option") -> None:
    """Refuse a NaN or infinite number among `options` (name -> value: numbers, sequences, dicts of them or
    tensors), naming the option and the value: `what` says what the names are ("merge option", ...)."""

    def check(name, value):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise NonFiniteError(f"{what} {name}={value!r} is not a finite number.")
        elif isinstance(value, torch.Tensor):
            counts = non_finite_counts(value)
            if counts is not None:
                raise NonFiniteError(f"{what} {name} holds {counts[0]} NaN / {counts[1]} inf values.")
        elif isinstance(value, dict):
            for key, item in value.items():
                check(f"{name}[{key!r}]", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                check(f"{name}[{index}]", item)

    for name, value in options.items():
        check(name, value)


# ---- 1. reading ----------------------------------------------------------------------------------------------------


def check_checkpoint_fits(checkpoint, specs: dict, source, kind: str) -> None:
    """Refuse, naming `source`, a checkpoint that lacks a tensor of `specs` (name -> planned tensor) or holds one of
    another shape: what `from_pretrained` would silently re-initialise must not be converted."""
    missing = [name for name in specs if name not in checkpoint]
    if missing:
        raise ValueError(f"'{source}' lacks weights its {kind} config needs: {missing[:10]}")
    wrong = [
        f"{name}: {tuple(checkpoint.shape(name))} in the checkpoint, {tuple(spec.shape)} in its config"
        for name, spec in specs.items()
        if checkpoint.shape(name) != spec.shape
    ]
    if wrong:
        raise ValueError(f"The weights of '{source}' do not fit its config: {wrong[:10]}")


class _SafetensorsFile:
    """One safetensors file: header parsed once, each tensor read with one `readinto` into its own storage."""

    def __init__(self, path: Path):
        self.path = path
        self.data_start, header = read_safetensors_header(path)
        self.entries = {}
        for name, entry in header.items():
            if entry.get("dtype") not in SAFETENSORS_DTYPES:
                raise OSError(
                    f"Model weights file '{path}' holds tensor {name} of dtype {entry.get('dtype')}, which torch "
                    "cannot hold."
                )
            begin, end = entry["data_offsets"]
            self.entries[name] = (SAFETENSORS_DTYPES[entry["dtype"]], torch.Size(entry["shape"]), begin, end)

    def shape(self, name):
        return self.entries[name][1]

    def dtype(self, name):
        return self.entries[name][0]

    def get(self, name) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            with self.path.open("rb") as handle:
                handle.seek(self.data_start + begin)
                if handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
                    raise OSError(f"Model weights file '{self.path}' ended inside tensor {name}.")
        return tensor

    def close(self):
        pass


class _PickleFile:
    """One `torch.save` file of tensors (a state dict, possibly under `state_dict` / `model`), memory-mapped. The
    map is dropped and re-opened once `max_mapped_bytes` of it were read, so the file pages touched (which count as
    resident while mapped) stay bounded; a legacy (non-zip) pickle cannot be mapped and is read whole."""

    def __init__(self, path: Path, max_mapped_bytes: int, unwrap: tuple[str, ...] = ("state_dict", "model")):
        self.path, self.max_mapped_bytes, self.unwrap = path, max_mapped_bytes, unwrap
        self._state, self._read = None, 0
        self.mapped = zipfile.is_zipfile(path)  # only the zip format (torch.save's since 1.6) can be mapped
        state = self._load()
        self.entries = {name: (t.dtype, t.shape) for name, t in state.items()}
        if not self.mapped:
            logger.warning(f"'{path}' is a legacy (non-zip) pickle: it is read whole into memory.")

    def _load(self) -> dict:
        if self._state is None:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self.mapped)
            for wrapper in self.unwrap:
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
            if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
                raise ValueError(f"{self.path} does not hold a state dict of tensors.")
            self._state, self._read = state, 0
        return self._state

    def shape(self, name):
        return self.entries[name][1]

    def dtype(self, name):
        return self.entries[name][0]

    def get(self, name) -> torch.Tensor:
        source = self._load()[name]
        tensor = torch.empty(source.shape, dtype=source.dtype).copy_(source)  # owned, contiguous
        if self.mapped:
            self._read += tensor.nbytes
            if self._read >= self.max_mapped_bytes:
                self.close()
        return tensor

    def close(self):
        self._state = None


class LazyCheckpoint:
    """The weights of a model folder, a Hub id or one weights file, read one tensor at a time.

    Args:
        name_or_path: A local model folder or Hub id (resolved as `from_pretrained` does: `model.safetensors`, its
            sharded index, else `pytorch_model.bin` and its index; `subfolder` and `revision` as there), or the path
            of a single `.safetensors` / `.bin` / `.pt` file.
        key_mapping: Renames the checkpoint's names (return None to hide one), e.g. legacy prefixes.
        max_mapped_bytes: For pickled checkpoints, how much of a memory-mapped file may be read before it is
            re-opened (bounds the resident file pages).
        label: How errors name the checkpoint (e.g. "fine-tune 2 of 3 ('path')"); default `'name_or_path'`.
        check_finite: Refuse (`NonFiniteError`, naming `label` and the tensor) a floating tensor holding NaN or inf
            as `get` reads it, so that no converter writes one into a model. The check costs a sum per tensor,
            kept in `sums` (name -> `tensor_sum`): a fingerprint of what was read, to tell identical inputs apart.

    Names are the (renamed) checkpoint names; `get(name)` returns a contiguous CPU tensor in the stored dtype that
    owns its memory (no view into a map), so dropping it frees it. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        key_mapping: Callable[[str], str | None] | None = None,
        subfolder: str = "",
        revision: str | None = None,
        max_mapped_bytes: int = 128 * 2**20,
        label: str | None = None,
        check_finite: bool = True,
    ):
        self.name_or_path = name_or_path
        self.label = f"'{name_or_path}'" if label is None else label
        self._check_finite = check_finite
        self.sums: dict[str, float] = {}
        self.files = weight_files(name_or_path, subfolder=subfolder, revision=revision)
        self._index: dict[str, tuple[object, str]] = {}
        self._readers = []
        for path in self.files:
            if path.suffix == ".safetensors":
                reader = _SafetensorsFile(path)
            else:
                reader = _PickleFile(path, max_mapped_bytes)
            self._readers.append(reader)
            for stored in reader.entries:
                name = key_mapping(stored) if key_mapping is not None else stored
                if name is None:
                    continue
                if name in self._index:
                    raise ValueError(f"'{name_or_path}' holds tensor '{name}' twice (in {self._index[name][0].path}).")
                self._index[name] = (reader, stored)

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def shape(self, name: str) -> torch.Size:
        reader, stored = self._entry(name)
        return reader.shape(stored)

    def dtype(self, name: str) -> torch.dtype:
        reader, stored = self._entry(name)
        return reader.dtype(stored)

    def nbytes(self, name: str) -> int:
        return self.shape(name).numel() * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        reader, stored = self._entry(name)
        tensor = reader.get(stored)
        if self._check_finite and tensor.is_floating_point():
            self.sums[name] = total = tensor_sum(tensor)
            if not math.isfinite(total):
                where = f" (stored as {stored})" if stored != name else ""
                if len(self._readers) > 1:
                    where += f" in {reader.path.name}"
                check_finite(tensor, name + where, self.label, total)
        return tensor

    def dtypes(self) -> set[torch.dtype]:
        return {self.dtype(name) for name in self._index}

    def _entry(self, name):
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"'{self.name_or_path}' has no tensor '{name}'.") from None

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def from_pretrained_names(model) -> Callable[[str], str | None]:
    """The key mapping `from_pretrained` applies when loading a checkpoint into `model` (a meta model is enough):
    transformers' renamings of legacy and saved-format names (e.g. LLaVA's `language_model.model.*`, a saved
    `SiglipVisionModel`'s unprefixed names) and the base-model prefix; names the model does not have map to None
    (ignored, as `from_pretrained` ignores unexpected keys). For `LazyCheckpoint(..., key_mapping=...)`. Checkpoint
    formats that need many-to-one conversions (e.g. per-expert MoE weights) are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model, add_legacy=True)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    names = model.state_dict()

    def rename(key: str) -> str | None:
        renamed, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if converter is not None:
            raise NotImplementedError(f"'{key}' needs transformers' conversion {converter}; not supported lazily.")
        return renamed if renamed in names else None

    return rename


def weight_files(name_or_path: str | Path, *, subfolder: str = "", revision: str | None = None) -> list[Path]:
    """The local paths of the weight files of a model folder or Hub id (downloaded as `from_pretrained` would:
    safetensors preferred, sharded indexes followed), or `[name_or_path]` for a single weights file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return [path]
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME as SAFE_INDEX,
    )
    from transformers.utils import (
        SAFE_WEIGHTS_NAME as SAFE,
    )
    from transformers.utils import (
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
        cached_file,
    )

    for single, index in ((SAFE, SAFE_INDEX), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        found = cached_file(
            name_or_path, single, subfolder=subfolder, revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if found is not None:
            return [Path(found)]
        found = cached_file(
            name_or_path, index, subfolder=subfolder, revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if found is not None:
            shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
            return [Path(cached_file(name_or_path, shard, subfolder=subfolder, revision=revision)) for shard in shards]
    if path.is_dir():  # a folder with weights under other names (e.g. a bare `weights.safetensors`)
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if files:
            return files
    raise OSError(f"'{name_or_path}' has no model weights (model.safetensors, pytorch_model.bin or their indexes).")


def loading_key_mapping(model: torch.nn.Module) -> Callable[[str], str]:
    """The renaming `from_pretrained` applies to a checkpoint's names when loading them into `model` (a meta-device
    build is enough): the model's weight renamings from transformers' conversion mapping (e.g. the `vision_model.`
    prefix of a `CLIPVisionModel` saved by transformers 4, legacy `gamma` / `beta`), then the base-model prefix
    added or stripped as the model's names need. Pass it as `LazyCheckpoint(key_mapping=...)` so that the
    checkpoint's names are the model's. Models whose loading converts weights (merged or split tensors) are
    refused: their tensors are not the checkpoint's."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [conversion for conversion in conversions if isinstance(conversion, WeightRenaming)]
    if len(renamings) != len(conversions):
        raise NotImplementedError(
            f"{type(model).__name__} is loaded through weight conversions ({conversions}); use from_pretrained."
        )
    names = {name: True for name in model.state_dict()}
    prefix = getattr(model, "base_model_prefix", None) or None

    def mapping(name: str) -> str:
        return rename_source_key(name, renamings, [], prefix, names)[0]

    return mapping


# ---- 2. building on the meta device --------------------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _geometry(tensor: torch.Tensor):
    return tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset(), tensor.dtype


def _generator_state(kwargs) -> tuple[torch.Generator, torch.Tensor]:
    generator = kwargs.get("generator") or torch.default_generator
    return generator, generator.get_state()


def _is_inplace(func) -> bool:
    arguments = func._schema.arguments
    return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write


def _has_meta(tree) -> bool:
    return any(isinstance(leaf, torch.Tensor) and leaf.device.type == "meta" for leaf in tree_leaves(tree))


class _InitRecorder(TorchDispatchMode):
    """Runs every random operation that meets a meta tensor on a scratch CPU tensor of the same geometry (so the RNG
    advances exactly as on the CPU) and records, per storage, the in-place operations it receives with the RNG state
    before each random one: enough to re-create its value later."""

    def __init__(self):
        super().__init__()
        self.log = defaultdict(list)  # storage key -> [(kind, function, geometry, args, kwargs, generator, state)]
        self._alive = []  # recorded storages stay referenced: a freed one's key could be reused by a new storage
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def scratch(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor of `tensor`'s geometry in one reused buffer: a fresh allocation per initialisation would leave
        glibc's heap fragmented (its mmap threshold rises past most weights once a large one is freed), and resident
        memory would grow with the model's depth."""
        span = tensor.storage_offset() + sum(
            (size - 1) * stride for size, stride in zip(tensor.size(), tensor.stride())
        )
        nbytes = (span + 1) * tensor.element_size() if tensor.numel() else 0
        if nbytes > self._buffer.numel():
            self._buffer = torch.empty(0, dtype=torch.uint8)  # freed before the larger one is allocated
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return (
            self._buffer[:nbytes].view(tensor.dtype).as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())
        )

    def record(self, tensor, kind, function, args, kwargs, generator=None, state=None):
        self._alive.append(tensor.untyped_storage())
        self.log[_storage_key(tensor)].append((kind, function, _geometry(tensor), args, kwargs, generator, state))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        random = torch.Tag.nondeterministic_seeded in func.tags
        if random and _is_inplace(func) and args[0].device.type == "meta":
            target = args[0]
            generator, state = _generator_state(kwargs)
            func(self.scratch(target), *args[1:], **kwargs)
            _release_after(target)
            self.record(target, "aten", func, args[1:], kwargs, generator, state)
            return target
        if random:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type == "meta":
                # A random factory (`torch.randn(...)` under the meta device): draw on the CPU, record as a fill.
                generator, state = _generator_state(kwargs)
                cpu_kwargs = {**kwargs, "device": torch.device("cpu")}
                func(*args, **cpu_kwargs)
                self.record(out, "factory", func, args, cpu_kwargs, generator, state)
            return out
        if _is_inplace(func) and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            self.record(args[0], "aten", func, args[1:], kwargs)
        return func(*args, **kwargs)


@contextmanager
def _init_functions_on_scratch(recorder: _InitRecorder):
    """`torch.nn.init` functions given a meta tensor run whole on a scratch CPU tensor (some are data-dependent,
    such as torch's rejection-sampling `trunc_normal_`, and skip meta tensors outright), and are recorded."""
    from transformers import initialization

    originals = dict(initialization.TORCH_INIT_FUNCTIONS)

    def on_scratch(name):
        original = originals[name]

        def init_function(tensor, *args, **kwargs):
            if not (isinstance(tensor, torch.Tensor) and tensor.device.type == "meta"):
                return original(tensor, *args, **kwargs)
            generator, state = _generator_state(kwargs)
            # on the CPU: under the meta device, `empty_like` and friends inside the function would be meta
            with torch.device("cpu"):
                original(recorder.scratch(tensor), *args, **kwargs)
            _release_after(tensor)  # e.g. the temporaries of torch's rejection-sampling trunc_normal_
            recorder.record(tensor, "init", original, args, kwargs, generator, state)
            return tensor

        return init_function

    replaced = {name: on_scratch(name) for name in originals}
    patched = []
    try:
        for module_name in initialization.TORCH_MODULES_TO_PATCH:
            module = sys.modules.get(module_name)
            for name, function in replaced.items():
                if module is not None and hasattr(module, name):
                    patched.append((module, name, getattr(module, name)))
                    setattr(module, name, function)
        initialization.TORCH_INIT_FUNCTIONS.update(replaced)
        yield
    finally:
        initialization.TORCH_INIT_FUNCTIONS.update(originals)
        for module, name, function in reversed(patched):
            setattr(module, name, function)


def build_on_meta(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, Callable[[str], torch.Tensor]]:
    """Run `build()` (e.g. `lambda: CLIPMoEModel(config)`) on the meta device, with its weight initialisation.

    Returns the meta-device model and `initial_value(name)`: the CPU tensor parameter or buffer `name` would hold
    had `build()` run on the CPU from the same RNG state, bit for bit. The RNG also ends where that CPU build would
    have left it. The cost is the CPU build's random draws (on one reused-size scratch tensor at a time), not its
    memory. `initial_value` raises NotImplementedError for a tensor whose initialisation reads another meta tensor
    (e.g. copied from one), and ValueError for one never initialised (its CPU value would be arbitrary memory).
    """
    import transformers.modeling_utils as modeling_utils

    recorder = _InitRecorder()
    # transformers skips `initialize_weights` under the meta device (from_pretrained loads weights over it anyway);
    # a CPU build runs it, so it runs here too, on scratch tensors.
    with (
        mock.patch.object(modeling_utils, "get_torch_context_manager_or_global_device", lambda: None),
        _init_functions_on_scratch(recorder),
        torch.device("meta"),
        recorder,
    ):
        model = build()
    recorder._buffer = None
    release_free_memory()
    # Keys and geometry as built: casting the model afterwards (`model.to(dtype)`) replaces its tensors.
    built = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        built[name] = (_storage_key(tensor), tensor.untyped_storage().nbytes(), _geometry(tensor))

    def initial_value(name: str) -> torch.Tensor:
        key, nbytes, (size, stride, offset, dtype) = built[name]
        entries = recorder.log.get(key)
        if not entries:
            raise ValueError(f"{name} is never initialised by the model's constructor; it has no defined value.")
        storage = torch.empty(nbytes // dtype.itemsize, dtype=dtype)
        saved = torch.get_rng_state()
        try:
            for kind, function, (e_size, e_stride, e_offset, e_dtype), args, kwargs, generator, state in entries:
                if e_dtype != dtype or _has_meta((args, kwargs)):
                    raise NotImplementedError(f"{name}: its initialisation ({function}) cannot be replayed on the CPU.")
                if state is not None:
                    generator.set_state(state)
                target = storage.as_strided(e_size, e_stride, e_offset)
                if kind == "factory":
                    target.copy_(function(*args, **kwargs))
                else:
                    with torch.device("cpu"):
                        function(target, *args, **kwargs)
                if state is not None and generator is not torch.default_generator:
                    generator.set_state(state)  # explicit generators are the caller's: leave them as found
        finally:
            torch.set_rng_state(saved)
        return storage.as_strided(size, stride, offset).clone()

    return model, initial_value


# ---- 3. writing ----------------------------------------------------------------------------------------------------


def meta_state_dict(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """`planned_state_dict` of `build()` built on the meta device without initialisation: the names, shapes and
    dtypes a checkpoint saved from that model holds (e.g. what to read from a dense checkpoint)."""
    with torch.device("meta"):
        return planned_state_dict(build())


def planned_state_dict(model) -> dict[str, torch.Tensor]:
    """What `model.save_pretrained` would write, as meta (or real) tensors in write order: the state dict without
    `_keys_to_ignore_on_save` and without tied duplicates (the name transformers keeps). Models whose checkpoint
    format transformers converts on saving are refused (their names and shapes would change)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state_dict.pop(key, None)
    state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    conversions = [
        c for c in get_model_conversion_mapping(model, add_legacy=False) if type(c).__name__ != "PrefixChange"
    ]
    if conversions:
        raise NotImplementedError(
            f"{type(model).__name__} is saved through weight conversions ({conversions}); streamed writing does not "
            "apply them."
        )
    return state_dict


def parse_size(size: int | str) -> int:
    """Bytes in `size` ("5GB", "500MB", "2GiB" or an int), as transformers' `max_shard_size`."""
    from huggingface_hub.serialization._base import parse_size_to_int

    return size if isinstance(size, int) else parse_size_to_int(size)


def shard_plan(specs: dict[str, torch.Tensor], max_shard_size: int | str, weights_name: str = SAFE_WEIGHTS_NAME):
    """`{file name: [tensor names]}` as `save_pretrained` shards (huggingface_hub's split, transformers' file names:
    one `model.safetensors`, or `model-00001-of-0000N.safetensors`) and the total size in bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards

    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(specs, filename_pattern=pattern, max_shard_size=max_shard_size)
    return split.filename_to_tensors, split.metadata["total_size"]


def write_safetensors_file(
    path: str | Path,
    specs: dict[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file holding `specs`' names, shapes and dtypes (tensors or meta tensors), each tensor
    obtained from `produce(name)` (in order, larger dtypes first) and written at once, so only one is in memory. A
    produced tensor with another shape or dtype than its spec raises ValueError, one holding NaN or inf (finite
    inputs overflowing: a huge option, or a `--dtype` too narrow for the values) `NonFiniteError`; the file is then
    incomplete: write into a temporary folder. The file is what `safetensors.torch.save_file` writes, up to the
    order of its tensors.
    """
    # Larger elements first (a stable sort; safetensors too orders by dtype): every tensor starts aligned to its size.
    specs = dict(sorted(specs.items(), key=lambda item: -item[1].element_size()))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, spec in specs.items():
        nbytes = spec.numel() * spec.element_size()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, spec in specs.items():
            tensor = produce(name)
            if tensor.shape != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(spec.shape)} {spec.dtype}."
                )
            tensor = tensor.detach().to("cpu").contiguous()
            counts = non_finite_counts(tensor)
            if counts is not None:
                raise NonFiniteError(
                    f"The output tensor {name} ({tensor.dtype}) would hold {counts[0]} NaN / {counts[1]} inf values "
                    "although its inputs are finite: an option too large, or an output dtype too narrow for its "
                    "values (--dtype float16 holds at most 65504). Nothing was written."
                )
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            _release_after(tensor)
            del tensor


def write_safetensors_shards(
    folder: str | Path,
    specs: dict[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    total_parameters: int | None = None,
    weights_name: str = SAFE_WEIGHTS_NAME,
) -> dict | None:
    """Write `specs` (name -> tensor or meta tensor, in write order) into `folder` as `save_pretrained` lays them out:
    one `model.safetensors`, or shards `model-0000i-of-0000N.safetensors` of at most `max_shard_size` each (a larger
    tensor gets its own) and `model.safetensors.index.json`; metadata `{"format": "pt"}`. `produce(name)` gives each
    tensor once, in order. Returns the index (None when unsharded)."""
    folder = Path(folder)
    files, total_size = shard_plan(specs, max_shard_size, weights_name)
    for file_name, names in files.items():
        write_safetensors_file(folder / file_name, {n: specs[n] for n in names}, produce, metadata={"format": "pt"})
    if len(files) == 1:
        return None
    metadata = {"total_size": total_size}
    if total_parameters is not None:
        metadata = {"total_parameters": total_parameters, **metadata}
    index = {"metadata": metadata, "weight_map": {n: f for f, names in files.items() for n in names}}
    index_name = weights_name.replace(".safetensors", ".safetensors.index.json")
    (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


class StreamedModel:
    """A model to save whose weights are never all in memory: a meta-device `PreTrainedModel` (its config, class,
    remote code and tied weights; cast it to the output dtype first) and `produce(name)`, called once per tensor of
    `planned_state_dict(model)` in that order, returning the tensor in the planned shape and dtype.

    `save_pretrained(folder)` writes what `model.save_pretrained(folder)` would for a model holding those tensors
    (config.json with `dtype`, `architectures` and `auto_map`, generation config, the remote-code files), with the
    weights streamed by `write_safetensors_shards`. `hf_moe.publish.write_model` takes it in place of a model.
    """

    def __init__(
        self, model, produce: Callable[[str], torch.Tensor], *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ):
        self.model, self.produce, self.max_shard_size = model, produce, max_shard_size
        self.specs = planned_state_dict(model)

    @property
    def config(self):
        return self.model.config

    @property
    def nbytes(self) -> int:
        """The size of the weights to write, in bytes."""
        return sum(spec.numel() * spec.element_size() for spec in self.specs.values())

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        # transformers writes config, generation config and code files; with no tensors, an empty weights file,
        # which the streamed one(s) then replace.
        self.model.save_pretrained(folder, state_dict={})
        (folder / SAFE_WEIGHTS_NAME).unlink(missing_ok=True)
        write_safetensors_shards(
            folder,
            self.specs,
            self.produce,
            max_shard_size=self.max_shard_size,
            total_parameters=self.model.num_parameters(),
        )


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`; a no-op elsewhere): freed tensors
    below glibc's (dynamic, up to 32 MB) mmap threshold otherwise stay resident."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _release_after(tensor: torch.Tensor, threshold: int = 2**20) -> None:
    """`release_free_memory` once work on a tensor of at least `threshold` bytes is done: its temporaries were freed
    below glibc's risen mmap threshold, and would otherwise pile up as the model gets deeper."""
    if tensor.numel() * tensor.element_size() >= threshold:
        release_free_memory()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes (Linux: ru_maxrss is in KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def folder_size(folder: str | Path) -> int:
    """Bytes of all files under `folder`."""
    return sum(os.path.getsize(path) for path in Path(folder).rglob("*") if path.is_file())

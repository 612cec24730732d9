"""`from_pretrained` with errors a user can act on.

transformers treats any name it cannot find locally as a Hub id: a mistyped local folder is retried against the
Hub (for tens of seconds offline) and ends in a message about repositories; a truncated safetensors file ends in
a deserialisation traceback that names no file; and a dense model given where a CLIP-MoE is needed (or the
reverse) fails late or, worse, silently does the wrong thing. `load_pretrained` checks all three first.

`HF_MOE_MODEL_TYPES` names the family of every hf-moe `model_type` (tests/test_loading.py checks it against the
configs `hf_moe.modeling` registers), so every hf-moe model is refused where a dense one is needed. `load_processor`
loads the processor the converters and merges save beside the model they write.
"""

import json
import os
import re
import struct
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

# model_type of every hf-moe model config (joint models and their single towers) -> its family.
HF_MOE_MODEL_TYPES = {
    "clip_moe": "CLIP-MoE",
    "clip_moe_text_model": "CLIP-MoE",
    "clip_moe_vision_model": "CLIP-MoE",
    "we_moe": "WEMoE",
    "we_moe_vision_model": "WEMoE",
    "moiie": "MoIIE",
    "mode": "MoDE",
}
# The CLIP-MoE model types: what `require_moe=True` asks for (router training and LoRA take a CLIP-MoE).
CLIP_MOE_MODEL_TYPES = {model_type for model_type, family in HF_MOE_MODEL_TYPES.items() if family == "CLIP-MoE"}
MOE_MODEL_TYPES = CLIP_MOE_MODEL_TYPES  # the older name


def _is_hub_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def looks_like_local_path(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` can only mean a local path: a `Path`, a name starting with `/`, `.` or `~`, or one
    with a path separator that is not a valid Hub repo id (`namespace/name`) or whose first part is an existing
    local folder (`runs/clip-moe` where `runs/` exists: a mistyped output folder, not the `runs` organisation)."""
    if isinstance(name_or_path, Path):
        return True
    name = str(name_or_path)
    if name.startswith(("/", ".", "~")):
        return True
    separators = [sep for sep in {os.sep, "/", os.altsep} if sep]
    if not any(sep in name for sep in separators):
        return False
    first = re.split("|".join(map(re.escape, separators)), name, maxsplit=1)[0]
    return not _is_hub_repo_id(name) or Path(first).is_dir()


def read_safetensors_header(path: str | Path) -> tuple[int, dict]:
    """(offset of the data, header without `__metadata__`) of the safetensors file `path`; an OSError naming `path`
    when the file is not complete (truncated, empty, garbled header). Reads only the header, so it is cheap for any
    size."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if 8 + header_size > size:
                raise ValueError(f"its header claims {header_size} bytes but the file has {size}")
            header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        ends = [entry["data_offsets"][1] for entry in header.values()]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as err:
        raise OSError(f"Model weights file '{path}' is corrupt ({err}); re-create or re-download it.") from err
    needed = 8 + header_size + max(ends, default=0)
    if size < needed:
        raise OSError(
            f"Model weights file '{path}' is truncated: {size} bytes, but its header needs {needed} "
            "(an interrupted copy or download?); re-create or re-download it."
        )
    return 8 + header_size, header


def check_safetensors_file(path: str | Path) -> None:
    """Raise an OSError naming `path` when it is not a complete safetensors file (see `read_safetensors_header`)."""
    read_safetensors_header(path)


def check_model_path(name_or_path: str | Path) -> str | Path:
    """Cheap checks before any loading: a local path must exist and be a folder, and its safetensors files
    must be complete. Hub ids pass unchanged. Returns `name_or_path`."""
    if not looks_like_local_path(name_or_path) and not Path(name_or_path).exists():
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder '{name_or_path}' does not exist.")
    if not path.is_dir():
        raise NotADirectoryError(
            f"'{name_or_path}' is a file; pass the model folder (the one holding config.json) instead."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder '{name_or_path}' holds no config.json; is it a saved model?")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights)
    return name_or_path


def check_moe(config, name_or_path, require_moe: bool | None) -> None:
    """Refuse a model of the wrong kind: anything but a CLIP-MoE where one is needed (`require_moe=True`), or any
    hf-moe model (CLIP-MoE, WEMoE, MoIIE, MoDE) where a dense model is (`require_moe=False`): loaded as a dense
    CLIP, a WEMoE or a MoDE would silently lose its routers, task vectors or experts."""
    model_type = getattr(config, "model_type", None)
    if require_moe and model_type not in CLIP_MOE_MODEL_TYPES:
        family = HF_MOE_MODEL_TYPES.get(model_type)
        kind = f"a {family} model ('{model_type}')" if family else f"a '{model_type}' model"
        upcycle = f"hf-moe upcycle-clip {name_or_path} --num_experts N --output_dir DIR"
        hint = "" if family else f": upcycle it first (`{upcycle}`) and pass DIR"
        raise ValueError(f"'{name_or_path}' is {kind}, not a CLIP-MoE (model_type 'clip_moe'){hint}.")
    if require_moe is False and model_type in HF_MOE_MODEL_TYPES:
        raise ValueError(
            f"'{name_or_path}' is already a {HF_MOE_MODEL_TYPES[model_type]} ('{model_type}'); this step needs a "
            "DENSE CLIP (model_type 'clip'), such as the checkpoint it was built from."
        )


def check_model_type(config, name_or_path, accepted: tuple[str, ...] | set[str], role: str) -> None:
    """Refuse a model whose `model_type` is not one of `accepted`, naming what `role` (e.g. "the dense seed of
    `hf-moe mode train-expert`") takes and, for an hf-moe model, its family."""
    model_type = getattr(config, "model_type", None)
    if model_type in accepted:
        return
    family = HF_MOE_MODEL_TYPES.get(model_type)
    kind = f"a {family} model ('{model_type}')" if family else f"a '{model_type}' model"
    takes = " or ".join(repr(t) for t in sorted(accepted))
    raise ValueError(f"'{name_or_path}' is {kind}; {role} takes model_type {takes}.")


def load_config(name_or_path: str | Path, *, trust_remote_code: bool = False, require_moe: bool | None = None):
    """`AutoConfig.from_pretrained` after `check_model_path`, with `require_moe` checked (no weights loaded)."""
    from transformers import AutoConfig

    import hf_moe.modeling  # noqa: F401  (registers hf-moe's configs, so its own models need no remote code)

    check_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        # transformers' messages span several lines; the CLI prints one.
        reason = " ".join(str(err).split())
        raise type(err)(f"Could not read the model config of '{name_or_path}': {reason}") from err
    check_moe(config, name_or_path, require_moe)
    return config


def dtype_option(name: str | None):
    """A `--dtype` value for `from_pretrained(dtype=...)`: `None` or "auto" give "auto" (the saved dtype, as
    transformers loads by default), a name the torch dtype of that name; anything else is refused by name."""
    if name in (None, "auto"):
        return "auto"
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype '{name}' is not a torch dtype (e.g. float32, bfloat16, float16).")
    return dtype


def device_option(device: str | None) -> str:
    """A `--device` value: the device given, or cuda where available, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pretrained(
    name_or_path: str | Path,
    auto_class=None,
    *,
    trust_remote_code: bool = False,
    require_moe: bool | None = None,
    **kwargs,
):
    """`auto_class.from_pretrained(name_or_path, **kwargs)` (default `AutoModel`) with clear errors.

    Args:
        name_or_path: Hub id or local folder.
        auto_class: An Auto class or a model class with `from_pretrained`.
        trust_remote_code: Run the `*.py` files of a folder or repo. hf-moe's own models do not need it in
            this process (importing `hf_moe.modeling` registers them with the Auto classes).
        require_moe: `True`: refuse anything but an hf-moe MoE; `False`: refuse an hf-moe MoE (steps that need
            a dense model, such as upcycling and MCL); `None`: accept both.
        kwargs: Passed to `from_pretrained` (`config`, `dtype`, `device_map`, ...); other keys override config
            fields (MoE fields on the towers too).

    Raises:
        FileNotFoundError: a local path that does not exist (at once, without trying the Hub).
        OSError: a truncated or corrupt weights file (named), or a model that cannot be loaded.
        ValueError: a dense model where an MoE is required, or the reverse.
    """
    from transformers import AutoModel

    auto_class = auto_class or AutoModel
    config = kwargs.pop("config", None)
    config_overrides = {key: kwargs.pop(key) for key in list(kwargs) if key not in _LOADING_KWARGS}
    if config is None:
        config = load_config(name_or_path, trust_remote_code=trust_remote_code, require_moe=require_moe)
    else:  # a config the caller already read (and may have edited)
        check_model_path(name_or_path)
        check_moe(config, name_or_path, require_moe)
    for key, value in config_overrides.items():
        _set_config_value(config, key, value)
    try:
        return auto_class.from_pretrained(name_or_path, config=config, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        raise OSError(f"Could not load the model '{name_or_path}': {err}") from err
    except Exception as err:
        # safetensors' and torch's deserialisation errors are not OSErrors; in a file that passed
        # `check_model_path` they mean a corrupt remote or non-safetensors checkpoint.
        if type(err).__name__ in ("SafetensorError", "UnpicklingError", "HeaderTooLarge", "HeaderTooSmall"):
            raise OSError(f"The weights of '{name_or_path}' are corrupt or truncated: {err}") from err
        raise


def load_processor(name_or_path: str | Path):
    """The processor of a checkpoint (an image processor alone for vision-only ones), or None (logged): what the
    converters and merges save next to the model they write."""
    from transformers import AutoImageProcessor, AutoProcessor

    for loader in (AutoProcessor, AutoImageProcessor):
        try:
            return loader.from_pretrained(name_or_path)
        except Exception as err:  # a bare weights folder: the model is usable, just without a processor
            reason = err
    logger.warning(f"No processor could be loaded from '{name_or_path}' ({reason}); the output folder will lack one.")
    return None


def load_clip_processor(name_or_path: str | Path | None, text_length: int | None = None):
    """The `AutoProcessor` of the CLIP checkpoint `name_or_path`, its tokenizer truncating at `text_length` (the
    model's text positions: 248 for a Long-CLIP model), or None (logged) where there is no base or it has no
    processor: what the CLIP-MoE commands save beside the models they write."""
    from transformers import AutoProcessor

    if name_or_path is None:
        logger.warning("No base folder is known, so the output folder gets no processor.")
        return None
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        if text_length is not None:
            processor.tokenizer.model_max_length = text_length
        return processor
    except Exception as err:  # a bare weights folder: the model is still usable, just not through pipeline()
        logger.warning(f"No processor could be loaded from '{name_or_path}' ({err}); the output folder will lack one.")
        return None


# `from_pretrained` keywords that are not config fields (anything else in kwargs overrides the config).
_LOADING_KWARGS = {
    "cache_dir",
    "device_map",
    "dtype",
    "torch_dtype",
    "experts_implementation",
    "attn_implementation",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "low_cpu_mem_usage",
    "max_memory",
    "offload_folder",
    "quantization_config",
    "use_safetensors",
    "weights_only",
    "ignore_mismatched_sizes",
    "output_loading_info",
    "tp_plan",
    "key_mapping",
}


def _set_config_value(config, key: str, value) -> None:
    """Set a config override on the joint config and, for MoE fields the towers carry, on each tower too
    (as `CLIPMoEConfig` does for its own constructor arguments)."""
    setattr(config, key, value)
    for sub_name in ("text_config", "vision_config"):
        sub_config = getattr(config, sub_name, None)
        if sub_config is not None and hasattr(sub_config, key):
            setattr(sub_config, key, value)

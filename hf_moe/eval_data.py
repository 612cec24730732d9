"""The data `hf-moe eval` and the evaluation suites read: every source a `datasets.Dataset`, columns canonical.

`load_eval_dataset` takes a Hugging Face Hub dataset id, a local dataset repository (the same files a Hub id
resolves to: parquet data files, a README.md with `configs:`), a `save_to_disk` folder, parquet file(s), an image
folder (class sub-folders, or images with `metadata.jsonl` captions: datasets' imagefolder), or a `Dataset` /
`DatasetDict` already in memory, and returns one split with the columns renamed to what the evaluation reads:
`image`, `label` (zero-shot) and `text` (retrieval: a caption or a list of captions per image).

    dataset = load_eval_dataset("tanganke/dtd", split="test")
    dataset = load_eval_dataset("uoft-cs/cifar100", split="test", image_column="img", label_column="fine_label")
    dataset = load_eval_dataset("cifar_saved/", split="test")        # DatasetDict.save_to_disk / Dataset.save_to_disk
    dataset = load_eval_dataset("data/test-*.parquet")               # parquet files: the split asked for (default test)

Problems a user can fix are one-line `ValueError` / `FileNotFoundError` / `OSError` messages naming the data, the
split and the column (with the columns there are), raised while only the data is read, before any model loads.
"""

import contextlib
import glob
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

# Source columns tried, in order, when no column is named (img: uoft-cs/cifar10; caption: nlphuji/flickr30k).
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label",)
CAPTION_COLUMNS = ("text", "caption", "captions")
# The split taken when the data has several and none is asked for.
DEFAULT_SPLITS = ("test", "validation")
# What each evaluation task reads beside `image`.
TASK_COLUMNS = {"zero-shot": "label", "retrieval": "text"}
DATA_FILE_SUFFIXES = (".parquet", ".arrow")
# The metadata file of a captioned image folder (datasets' imagefolder): not a data file of a repository.
_IMAGEFOLDER_METADATA = ("metadata.parquet", "metadata.jsonl", "metadata.csv")
# A Hub id: `name` or `namespace/name` (letters, digits, `-`, `_`, `.`), as huggingface_hub validates repo ids.
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def load_eval_dataset(
    data,
    split: str | None = None,
    *,
    config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    filters: Mapping | None = None,
    task: str | None = None,
):
    """One split of evaluation data as a `datasets.Dataset` with canonical columns `image` (+ `label`, `text`).

    Args:
        data: A `datasets.Dataset` / `DatasetDict`; a `save_to_disk` folder (`load_from_disk`); a parquet file, a
            glob of them (`data/test-*.parquet`) or a list of them; a local dataset repository (a folder of parquet
            / arrow data files, optionally with a README.md `configs:` section: read by `datasets.load_dataset`,
            as a Hub id is); an image folder (class sub-folders, or images + `metadata.jsonl`: datasets'
            imagefolder); or a Hub dataset id (`datasets.load_dataset(data, config, split=split)`).
        split: The split (default: `test`, else `validation`, else the only one). Parquet files given as files are
            the split asked for.
        config: The dataset configuration (Hub ids and dataset repositories), e.g. `cropped_digits` for SVHN.
        image_column, label_column, caption_column: The source columns renamed to `image`, `label`, `text`
            (defaults: `image` or `img`; `label`; `text`, `caption` or `captions`). A named column must exist.
        filters: `{column: value}` (or `{column: [values]}`): only the rows whose source column equals the value
            are kept, before the columns are renamed (e.g. `{"split": "test"}` for nlphuji/flickr30k).
        task: `"zero-shot"` or `"retrieval"`: the column the task reads beside `image` (`label` / `text`) must
            be there; default: only `image` is required.

    A `label` column of strings is encoded as a `ClassLabel` (names in sorted order); a `ClassLabel` gives the
    class names (`hf_moe.evaluation.dataset_class_names`).
    """
    import datasets

    if task is not None and task not in TASK_COLUMNS:
        raise ValueError(f"task must be one of {list(TASK_COLUMNS)} or None, got {task!r}.")
    where = _describe(data)
    # An image folder's missing labels / captions are explained by `hf_moe.evaluation` in terms of its layout.
    dataset, split, image_folder = _load(data, split, config, where)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"data must be a path, a Hub dataset id, a datasets.Dataset or a DatasetDict, not {type(dataset).__name__}."
        )
    where = f"{where} (split '{split}')" if split is not None else where
    if filters:
        dataset = _filter_rows(dataset, filters, where)
    return canonical_columns(
        dataset,
        where,
        image_column=image_column,
        label_column=label_column,
        caption_column=caption_column,
        task=None if image_folder else task,
    )


def canonical_columns(
    dataset, where: str = "The data", *, image_column=None, label_column=None, caption_column=None, task=None
):
    """`dataset` with its image / label / caption columns renamed to `image` / `label` / `text` (see
    `load_eval_dataset`); `where` names the data in errors."""
    import datasets

    renames = {}
    for target, named, defaults, option in (
        ("image", image_column, IMAGE_COLUMNS, "image_column"),
        ("label", label_column, LABEL_COLUMNS, "label_column"),
        ("text", caption_column, CAPTION_COLUMNS, "caption_column"),
    ):
        source = _source_column(dataset, named, defaults, where, option)
        required = target == "image" or TASK_COLUMNS.get(task) == target
        if source is None and required:
            raise ValueError(
                f"{where} has no {_what(target)} column {_names(defaults)}; its columns are {dataset.column_names}. "
                f"Name it with --{option} (`{option}=`)."
            )
        if source is not None and source != target:
            renames[source] = target
    # A canonical column that another column replaces goes first (e.g. `label` when --label_column fine_label).
    replaced = [target for target in renames.values() if target in dataset.column_names and target not in renames]
    if replaced:
        dataset = dataset.remove_columns(replaced)
    if renames:
        dataset = dataset.rename_columns(renames)
    if "label" in dataset.column_names:
        feature = dataset.features["label"]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            dataset = dataset.class_encode_column("label")
        elif not isinstance(feature, datasets.ClassLabel) and not (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        ):
            source = {v: k for k, v in renames.items()}.get("label", "label")
            raise ValueError(
                f"{where}: label column '{source}' holds {feature}, not class ids (a ClassLabel, integers or "
                "strings); name the class column with --label_column."
            )
    return dataset


def _source_column(dataset, named, defaults, where, option) -> str | None:
    if named is not None:
        if named not in dataset.column_names:
            raise ValueError(f"{where} has no column '{named}' (--{option}); its columns are {dataset.column_names}.")
        return named
    return next((column for column in defaults if column in dataset.column_names), None)


def _what(target: str) -> str:
    return {"image": "image", "label": "label", "text": "caption"}[target]


def _names(columns: Sequence[str]) -> str:
    return " or ".join(f"'{column}'" for column in columns)


def _filter_rows(dataset, filters: Mapping, where: str):
    for column, value in filters.items():
        if column not in dataset.column_names:
            raise ValueError(f"{where} has no column '{column}' to filter on; its columns are {dataset.column_names}.")
        allowed = set(value) if isinstance(value, (list, tuple, set)) else {value}
        kept = [row for row, cell in enumerate(dataset.select_columns([column])[:][column]) if cell in allowed]
        if not kept:
            raise ValueError(f"{where}: no row has {column} in {sorted(map(str, allowed))}.")
        dataset = dataset.select(kept)
    return dataset


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


def _describe(data) -> str:
    if isinstance(data, (str, os.PathLike)):
        return f"Data '{os.fspath(data)}'"
    if isinstance(data, (list, tuple)):
        return f"Data files {[os.fspath(path) for path in data]}"
    return "The data"


def _load(data, split, config, where):
    """`(dataset, split, whether data is an image folder)` read from `data`, one split picked."""
    if isinstance(data, (list, tuple)):
        return *_load_files([Path(path).expanduser() for path in data], split, config, where), False
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        path = Path(text).expanduser()
        if glob.has_magic(text):
            files = sorted(Path(found) for found in glob.glob(str(path)))
            if not files:
                raise FileNotFoundError(f"{where}: no file matches the pattern.")
            return *_load_files(files, split, config, where), False
        if path.is_file():
            return *_load_files([path], split, config, where), False
        if path.is_dir():
            return _load_folder(path, split, config, where)
        if _looks_local(text):
            raise FileNotFoundError(f"{where} does not exist (no such file or folder).")
        return *_load_repository(text, split, config, where, hub=True), False
    if config is not None:
        raise ValueError(
            f"config={config!r} applies to Hub ids and dataset repositories, not to a {type(data).__name__}."
        )
    return *_pick_split(data, split, where), False


def is_hub_id(data) -> bool:
    """Whether `data` is read as a Hugging Face Hub dataset id: a string (`name` or `namespace/name`) that is no
    local file or folder (nor a pattern) and does not look like a local path."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    text = os.fspath(data)
    return not glob.has_magic(text) and not Path(text).expanduser().exists() and not _looks_local(text)


def _looks_local(text: str) -> bool:
    """Whether a path that does not exist was meant as a local path rather than a Hub id (`name`, `org/name`)."""
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith(("/", *DATA_FILE_SUFFIXES, ".json", ".jsonl", ".csv"))
        or not _HUB_ID.match(text)
    )


def _load_files(files: list[Path], split, config, where):
    import datasets

    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: {missing} does not exist.")
    suffixes = {path.suffix for path in files}
    if len(suffixes) != 1 or not suffixes <= set(DATA_FILE_SUFFIXES):
        raise ValueError(
            f"{where}: data files must all be parquet (or all arrow) files, got {sorted(suffixes)}; for a folder of "
            "images, a save_to_disk folder or a dataset repository, pass the folder."
        )
    if config is not None:
        raise ValueError(f"{where}: --dataset_config applies to Hub ids and dataset repositories, not to data files.")
    split = split or DEFAULT_SPLITS[0]  # files given as files are the split asked for
    builder = "parquet" if suffixes == {".parquet"} else "arrow"
    from .data import quiet_local_loading

    with quiet_local_loading():
        dataset = datasets.load_dataset(builder, data_files={split: [str(path) for path in files]}, split=split)
    return dataset, split


def _load_folder(path: Path, split, config, where):
    """`(dataset, split, whether the folder is an image folder)` of a save_to_disk folder, a dataset repository
    or an image folder."""
    import datasets

    from .data import quiet_local_loading

    if _is_saved_dataset(path):
        if config is not None:
            raise ValueError(f"{where} is a save_to_disk folder: --dataset_config applies to Hub ids and repositories.")
        return *_pick_split(datasets.load_from_disk(str(path)), split, where), False
    if _is_dataset_repository(path):
        return *_load_repository(str(path), split, config, where), False
    if config is not None:
        raise ValueError(f"{where} is an image folder: --dataset_config applies to Hub ids and dataset repositories.")
    with quiet_local_loading():
        return *_pick_split(datasets.load_dataset("imagefolder", data_dir=str(path)), split, where), True


def _is_saved_dataset(path: Path) -> bool:
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _is_dataset_repository(path: Path) -> bool:
    """A folder `datasets.load_dataset(folder)` reads as a Hub repository: data files (parquet / arrow, not an image
    folder's metadata file), or a README.md whose YAML header declares `configs` / `dataset_info`."""
    readme = path / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        header = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
        if re.search(r"^(configs|dataset_info):", header, flags=re.MULTILINE):
            return True
    return any(
        found.suffix in DATA_FILE_SUFFIXES and found.name not in _IMAGEFOLDER_METADATA
        for found in path.rglob("*")
        if found.is_file()
    )


def _load_repository(name: str, split, config, where, hub: bool = False):
    """`datasets.load_dataset(name, config, split=...)` for a Hub id or a local repository folder, the errors
    rewritten to name the data; without a split, the split names are read first (nothing else is downloaded)."""
    import datasets

    config_text = f", config '{config}'" if config is not None else ""
    try:
        if split is None:
            names = datasets.get_dataset_split_names(name, config)
            split = _default_split(names, where)
        from .data import quiet_local_loading

        with quiet_local_loading() if not hub else contextlib.nullcontext():
            dataset = datasets.load_dataset(name, config, split=split)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise FileNotFoundError(
            f"{where} is neither a local file or folder nor a dataset on the Hugging Face Hub ({_first_line(err)})."
        ) from err
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE=1) or no network
        raise OSError(
            f"Cannot reach the Hugging Face Hub for dataset '{name}'{config_text} (offline, or no network), and there "
            f"is no local file or folder '{name}': {_first_line(err)}. Load it where there is network and pass its "
            "save_to_disk folder or its parquet files."
        ) from err
    except ValueError as err:  # an unknown config or split
        raise ValueError(f"{where}{config_text}, split '{split}': {_first_line(err)}") from err
    return dataset, split


def _first_line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _default_split(names, where) -> str:
    names = list(names)
    if len(names) == 1:
        return names[0]
    split = next((name for name in DEFAULT_SPLITS if name in names), None)
    if split is None:
        raise ValueError(f"{where} has splits {names}; choose one with --split (split=...).")
    return split


def _pick_split(data, split, where):
    """One split of a `DatasetDict` (see `load_eval_dataset`), or a `Dataset` checked against `split`."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split is None:
            split = _default_split(data, where)
        if split not in data:
            raise ValueError(f"{where} has no split '{split}'; it has {list(data)}.")
        return data[split], split
    if split is not None and isinstance(data, datasets.Dataset) and data.split is not None:
        if str(data.split) != split:
            raise ValueError(f"{where}: split '{split}' was asked for but the Dataset is split '{data.split}'.")
    return data, split if split is not None else (str(data.split) if getattr(data, "split", None) else None)

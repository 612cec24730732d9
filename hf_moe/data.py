# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Image-caption data through the `datasets` library, for CLIP and CLIP-MoE training.

Three on-disk layouts load into one row format, `{"image": PIL.Image, "text": str, ...metadata}`:

- an image folder with `metadata.jsonl` / `metadata.csv` / `metadata.parquet` (datasets' imagefolder convention);
- img2dataset's "files" output (`00000/000000001.jpg` + `.txt` caption + optional `.json`);
- webdataset tar shards (a folder of `*.tar`, one `.tar`, or a glob / brace pattern such as
  `shards/{00000..00099}.tar`), streamed by default.

Rows whose image cannot be decoded or whose caption is missing or empty are skipped, counted and logged, and so is
the unread rest of a truncated or corrupt shard (the shards after it are still read). Image paths in imagefolder
metadata must stay inside its folder: an absolute or `../` path is refused, naming the file, line and value, unless
`allow_outside_image_paths` (or `HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS=1`) allows it.
`ImageTextCollator` turns rows into model inputs with the model's own processor.
"""

import contextlib
import csv
import functools
import gzip
import io
import json
import lzma
import numbers
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
from datasets import Dataset, Features, Image, IterableDataset, Value, load_dataset
from datasets.builder import Key
from datasets.fingerprint import Hasher
from datasets.packaged_modules.webdataset.webdataset import WebDataset
from PIL import Image as PILImage
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Keys of a sample's `.json` that may hold its caption when there is no `.txt` (img2dataset writes `caption`).
JSON_CAPTION_KEYS = ("caption", "text")

MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MISSING_CAPTION = "missing or empty caption"
TRUNCATED_SHARD = "truncated or corrupt shard"

# Examples of skipped rows kept per reason in a `SkipReport`, to point the user at the bad files.
_MAX_EXAMPLES = 3
# A stream logs each of its first skipped rows, then only at 100, 1000, ... skipped rows.
_LOG_EACH_FIRST = 10


@dataclass
class SkipReport:
    """What `validate_image_text_dataset` skipped.

    For a map-style dataset the counts are final when it returns. For a streaming dataset rows are checked while
    the dataset is iterated, so the counts grow with the iteration (and accumulate over epochs); with DataLoader
    workers each worker counts (and logs) its own rows, and this object, in the main process, stays at zero.

    Args:
        num_rows (`int`): rows checked.
        skipped (`Counter[str]`): number of skipped rows per reason (`MISSING_IMAGE`, `UNREADABLE_IMAGE`,
            `MISSING_CAPTION`, `TRUNCATED_SHARD`). A truncated shard counts once: the samples it lost were never
            read, so they are neither rows nor skipped rows.
        examples (`dict[str, list[str]]`): a few skipped rows per reason (image path, sample key or row number;
            for a truncated shard, the shard file and the last sample read from it).
    """

    num_rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_kept(self) -> int:
        return self.num_rows - self.num_skipped

    def record(self, reason: str, where: Callable[[], str]) -> None:
        """Count a skipped row; `where` (called only for the first few rows of a reason) points at it."""
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(where())

    def summary(self) -> str:
        reasons = ", ".join(
            f"{count} {reason} (e.g. {', '.join(self.examples.get(reason, []))})"
            for reason, count in sorted(self.skipped.items())
        )
        return f"skipped {self.num_skipped} of {self.num_rows} rows" + (f": {reasons}" if reasons else "")


def load_image_text_dataset(
    data: str | Path,
    streaming: bool | None = None,
    split: str = "train",
    image_column: str = "image",
    text_column: str = "text",
    validate: bool = True,
    num_proc: int | None = None,
    allow_outside_image_paths: bool | None = None,
) -> Dataset | IterableDataset:
    """Load image-caption pairs from an image folder, an img2dataset folder or webdataset tar shards.

    The layout is detected from `data`. Rows come out as `{"image": PIL.Image, "text": str, ...}` plus the
    source's other metadata (imagefolder metadata columns; the sample's `.json` as a `json` column and its key as
    `__key__` for img2dataset and shards, as datasets' webdataset loader names them). `text` is a list of captions
    where the imagefolder metadata holds lists. Rows with an unreadable image or a missing or empty caption are
    skipped and counted (see `validate_image_text_dataset`).

    Shards follow datasets' webdataset loader, which infers the fields from the first samples of the first shard:
    those must all hold the same fields (an image and a `.txt` or `.json`); a later sample without its caption
    file is skipped and counted like the others.

    Args:
        data (`str` or `Path`):
            An image folder with `metadata.jsonl`/`.csv`/`.parquet`, an img2dataset "files" output folder, a folder
            of `*.tar` shards, one `.tar` file, or a glob / brace pattern of shards (`shards/{00000..00099}.tar`).
        streaming (`bool`, *optional*):
            Return a lazily read `IterableDataset`. Defaults to `True` for tar shards (sets that may not fit on
            local disk or in memory) and `False` otherwise.
        split (`str`, defaults to `"train"`):
            The split to load (imagefolder and shards; an img2dataset folder is one split).
        image_column (`str`, defaults to `"image"`):
            The image column of imagefolder metadata (`<image_column>_file_name`), or the preferred image field of
            a shard sample (e.g. `"png"` when samples hold several images). Renamed to `image`.
        text_column (`str`, defaults to `"text"`):
            The caption column of imagefolder metadata, or the caption field (or `.json` key) of a sample, tried
            before `txt` and the `.json`'s `caption` / `text`. Renamed to `text`.
        validate (`bool`, defaults to `True`):
            Skip and count unreadable images and missing captions. Pass `False` to call
            `validate_image_text_dataset` yourself and get its `SkipReport`.
        num_proc (`int`, *optional*):
            Processes for the up-front check of a map-style dataset.
        allow_outside_image_paths (`bool`, *optional*):
            Accept imagefolder metadata whose image paths are absolute or climb out of the metadata's folder
            (`../`); refused by default, naming the file, line and value. Unset: the environment variable
            `HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS=1` allows them (how the `hf-moe` commands take this option).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`.
    """
    layout, source = detect_layout(data)
    if streaming is None:
        streaming = layout == "webdataset"
    if layout == "imagefolder":
        if allow_outside_image_paths is None:
            allow_outside_image_paths = os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes")
        outside = check_metadata_image_paths(source, split, allow_outside_image_paths)
        if outside:
            dataset = _load_metadata_by_hand(source, split, streaming, image_column, text_column)
        else:
            dataset = _load_imagefolder(source, split, streaming, image_column, text_column)
    elif layout == "img2dataset":
        dataset = _load_img2dataset(source, streaming, text_column)
    else:
        dataset = _load_webdataset(source, split, streaming, image_column, text_column)
    logger.info(f"Loaded {layout} data from {data}" + ("" if streaming else f": {len(dataset)} rows"))
    if validate:
        dataset, _ = validate_image_text_dataset(dataset, num_proc=num_proc)
    return dataset


def validate_image_text_dataset(
    dataset: Dataset | IterableDataset,
    image_column: str = "image",
    text_column: str = "text",
    num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, SkipReport]:
    """Drop rows whose image cannot be decoded or whose caption is missing or empty, and count them.

    A map-style dataset is checked up front (every image decoded once, with a progress bar) and the skip counts
    are logged at warning level. A streaming dataset is filtered lazily: each skipped row is counted in the
    returned report while iterating, and the first skips and then every power of ten are logged.

    A caption is a non-empty string, or a list whose first element is one (the caption `ImageTextCollator` uses).

    Args:
        dataset (`Dataset` or `IterableDataset`):
            Rows with an image column (a `datasets.Image` feature, PIL images or paths) and a caption column.
        image_column (`str`, defaults to `"image"`):
            The image column.
        text_column (`str`, defaults to `"text"`):
            The caption column.
        num_proc (`int`, *optional*):
            Processes for the up-front check of a map-style dataset.

    Returns:
        `tuple[Dataset | IterableDataset, SkipReport]`: the dataset without the bad rows (its features unchanged)
        and the report.
    """
    features = dataset.features
    if features is not None:
        missing = [column for column in (image_column, text_column) if column not in features]
        if missing:
            raise ValueError(f"The dataset has no column {missing} (its columns: {list(features)}).")
    if isinstance(dataset, IterableDataset):
        return _validate_streaming(dataset, image_column, text_column)
    return _validate_map_style(dataset, image_column, text_column, num_proc)


@dataclass
class ImageTextCollator:
    """Collate image-caption rows into CLIP inputs with the model's own processor, for a `DataLoader` or `Trainer`
    (with `remove_unused_columns=False`, so that the rows reach the collator).

    Returns `input_ids` and `attention_mask` padded to the longest caption of the batch and truncated to
    `max_length`, `pixel_values` from the processor's image pipeline (images converted to RGB first), and `index`
    (a `torch.long` tensor) when every row has an integer `index` column (see `add_index_column`). A row whose
    `text` is a list of captions contributes its first caption.

    Args:
        processor (`ProcessorMixin`):
            The model's processor (e.g. `CLIPProcessor`), with a tokenizer and an image processor.
        max_length (`int`, *optional*):
            Caption length limit in tokens. Defaults to the tokenizer's `model_max_length` (77 for CLIP, 248 for
            Long-CLIP models), read at each call.
    """

    processor: ProcessorMixin
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> BatchFeature:
        captions = [first_caption(row["text"]) for row in rows]
        if any(not caption for caption in captions):
            raise ValueError("A row has no caption; load the data with `load_image_text_dataset` to skip such rows.")
        images = [row["image"] if row["image"].mode == "RGB" else row["image"].convert("RGB") for row in rows]
        # `max_length=None` with `truncation=True` truncates to the tokenizer's `model_max_length`.
        batch = self.processor(
            text=captions,
            images=images,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        indices = [row.get("index") for row in rows]
        if all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices):
            batch["index"] = torch.tensor([int(i) for i in indices], dtype=torch.long)
        return batch


def add_index_column(dataset: Dataset, column: str = "index") -> Dataset:
    """Add an integer column holding each row's position (0 to `len(dataset) - 1`).

    It is stored with the data, so it stays with its row through shuffling, sampling and DataLoader workers: MCL
    uses it to look up per-sample cluster labels. Add it after validation so that it counts the kept rows.

    Args:
        dataset (`Dataset`):
            A map-style dataset.
        column (`str`, defaults to `"index"`):
            The new column's name.

    Returns:
        `Dataset`: the dataset with the new column.
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("add_index_column needs a map-style dataset: load the data with `streaming=False`.")
    if column in dataset.column_names:
        raise ValueError(f"The dataset already has a column {column!r}.")
    return dataset.add_column(column, np.arange(len(dataset), dtype=np.int64))


# Layout detection


def detect_layout(data: str | Path) -> tuple[str, Path | list[str]]:
    """`("imagefolder" | "img2dataset", folder)` or `("webdataset", shard paths)`."""
    text = os.path.expanduser(str(data))
    path = Path(text)
    if not path.exists() and re.search(r"[*?\[{]", text):
        shards = expand_shard_pattern(text)
        if not shards:
            raise ValueError(f"No tar shard matches {str(data)!r}.")
        return "webdataset", shards
    if path.is_file():
        if path.suffix != ".tar":
            raise ValueError(f"{str(data)!r} is a file but not a .tar shard; pass a folder, a shard or a pattern.")
        return "webdataset", [str(path)]
    if not path.is_dir():
        raise ValueError(f"{str(data)!r} does not exist.")
    if any((path / name).is_file() for name in METADATA_FILENAMES):
        return "imagefolder", path
    shards = sorted(str(shard) for shard in path.glob("*.tar"))
    if shards:
        return "webdataset", shards
    # Metadata one level down: an image folder with one sub-folder per split (`train/metadata.jsonl`).
    if any(any(path.glob(f"*/{name}")) for name in METADATA_FILENAMES):
        return "imagefolder", path
    if _find_img2dataset_samples(path, limit=1):
        return "img2dataset", path
    raise ValueError(
        f"Cannot tell the layout of {str(data)!r}: expected an image folder with one of {list(METADATA_FILENAMES)}, "
        "an img2dataset folder (sub-folders of images with same-named .txt captions), a folder of .tar shards, "
        "a .tar file, or a glob / brace pattern of shards."
    )


def expand_shard_pattern(pattern: str) -> list[str]:
    """Expand webdataset brace notation (`{000..099}`, `{a,b}`) and globs into the sorted existing files."""
    files = set()
    for expanded in _expand_braces(pattern):
        if re.search(r"[*?\[]", expanded):
            files.update(glob(expanded))
        elif os.path.isfile(expanded):
            files.add(expanded)
    return sorted(files)


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start, stop = numeric.groups()
        # Zero-padded like the bounds, as webdataset and img2dataset name shards (`00000.tar`).
        options = [str(i).zfill(len(start)) for i in range(int(start), int(stop) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


# Image paths of imagefolder metadata


ALLOW_OUTSIDE_ENV = "HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS"


def _metadata_files(folder: Path, split: str) -> list[Path]:
    """The metadata files datasets' imagefolder reads for `split`: at the top of `folder`, else in its split
    sub-folder (`train/metadata.jsonl`)."""
    for directory in (folder, folder / split):
        found = [directory / name for name in METADATA_FILENAMES if (directory / name).is_file()]
        if found:
            return found
    return []


def _metadata_rows(path: Path):
    """`(where, {column: value})` of every row of a metadata file, `where` naming the file and line (or row)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number} is not JSON ({err}): {line.strip()[:200]!r}.") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number} is not a JSON object: {line.strip()[:200]!r}.")
                yield f"{path} line {number}", row
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as file:
            # Line numbers of the file: the header is line 1 (a caption with a newline makes this approximate).
            for number, row in enumerate(csv.DictReader(file), start=2):
                yield f"{path} line {number}", row
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[n for n in pq.read_schema(path).names if _is_file_name_column(n)])
        for number, row in enumerate(table.to_pylist()):
            yield f"{path} row {number}", row


def _is_file_name_column(name: str) -> bool:
    return name == "file_name" or name.endswith("_file_name")


def _outside_folder(value: str) -> bool:
    """Whether a metadata image path is absolute or climbs out of the metadata's folder (`../`)."""
    normal = os.path.normpath(value)
    return os.path.isabs(value) or os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep)


def check_metadata_image_paths(folder: str | Path, split: str = "train", allow_outside: bool = False) -> bool:
    """Check the image paths (`file_name` / `*_file_name`) of an image folder's metadata, before anything loads.

    An absolute path or one that climbs out of the metadata's folder (`../`) is refused, naming the file, line and
    value: a data set must not read files outside its folder unless asked to. With `allow_outside`, such paths are
    accepted. Returns whether any path lies outside (datasets' imagefolder cannot load those: the caller loads the
    metadata itself).
    """
    outside = False
    for path in _metadata_files(Path(folder), split):
        for where, row in _metadata_rows(path):
            for column, value in row.items():
                if not _is_file_name_column(column) or not isinstance(value, str) or not _outside_folder(value):
                    continue
                if not allow_outside:
                    raise ValueError(
                        f"{where}: {column} {value!r} lies outside {path.parent} (an absolute path or '../'); image "
                        f"paths in {path.name} must be relative to its folder. To read images from elsewhere, pass "
                        f"allow_outside_image_paths=True (hf-moe commands: set {ALLOW_OUTSIDE_ENV}=1)."
                    )
                outside = True
    return outside


def _load_metadata_by_hand(
    folder: Path, split: str, streaming: bool, image_column: str, text_column: str
) -> Dataset | IterableDataset:
    """An image folder whose metadata names images outside it (allowed by the caller): datasets' imagefolder refuses
    such paths, so the metadata is read as a table and its paths resolved against the metadata's folder."""
    files = _metadata_files(folder, split)
    if len(files) > 1:
        raise ValueError(f"{folder} has several metadata files ({[f.name for f in files]}); keep one.")
    metadata = files[0]
    kind = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[metadata.suffix]
    with quiet_local_loading():
        table = load_dataset(kind, data_files=str(metadata), split="train")
    for column in [name for name in table.column_names if _is_file_name_column(name)]:
        feature = "image" if column == "file_name" else column[: -len("_file_name")]
        # os.path.join keeps an absolute path as it is and resolves a relative one against the metadata's folder.
        paths = [None if v is None else os.path.normpath(os.path.join(metadata.parent, v)) for v in table[column]]
        table = table.remove_columns(column).add_column(feature, paths).cast_column(feature, Image())
    dataset = table.to_iterable_dataset() if streaming else table
    return _rename_metadata_columns(dataset, folder, image_column, text_column)


# Loaders


@contextlib.contextmanager
def quiet_local_loading():
    """datasets' progress bars off while local files load: for a local folder its "Downloading data" bar counts
    files it only hashes, and "Generating train split" repeats the count the check that follows shows with its
    own bar."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_imagefolder(
    folder: Path, split: str, streaming: bool, image_column: str, text_column: str
) -> Dataset | IterableDataset:
    with quiet_local_loading():
        dataset = load_dataset("imagefolder", data_dir=str(folder), split=split, streaming=streaming)
    return _rename_metadata_columns(dataset, folder, image_column, text_column)


def _rename_metadata_columns(dataset, folder: Path, image_column: str, text_column: str):
    columns = list(dataset.features)
    sources = {image_column: "image", text_column: "text"}
    for source, target in sources.items():
        if source not in columns:
            raise ValueError(
                f"The metadata of {str(folder)!r} has no {target} column {source!r} (its columns: {columns}); pass "
                f"`{target}_column=` the column that holds the {target}s."
            )
    renames = {source: target for source, target in sources.items() if source != target}
    return dataset.rename_columns(renames) if renames else dataset


def _load_img2dataset(folder: Path, streaming: bool, text_column: str) -> Dataset | IterableDataset:
    # An in-memory table of image paths and captions, rather than the imagefolder loader with a generated
    # metadata file: captions are small and must be read from the .txt files anyway, nothing is written into the
    # user's (possibly read-only) data folder, and there is no cache keyed on file names to go stale when a
    # caption file is edited. Images stay on disk and are decoded on access by the `Image` feature.
    samples = _find_img2dataset_samples(folder)
    rows, unparsable = [], 0
    for key, files in logging.tqdm(samples, desc="Reading captions", disable=len(samples) < 10_000):
        metadata = None
        if "json" in files:
            try:
                metadata = json.loads(Path(files["json"]).read_text(encoding="utf-8"))
            except (ValueError, OSError):
                unparsable += 1
        caption = Path(files["txt"]).read_text(encoding="utf-8", errors="replace") if "txt" in files else None
        fields = {"txt": caption, "json": metadata if isinstance(metadata, dict) else None}
        rows.append(
            {
                "image": _pick_image({ext: files[ext] for ext in IMAGE_EXTENSIONS if ext in files}, ""),
                "text": _pick_caption(fields, text_column),
                "json": fields["json"],
                "__key__": key,
            }
        )
    if unparsable:
        logger.warning(f"{unparsable} .json files in {folder} are not valid JSON: their rows have `json=None`.")
    if not any(row["json"] for row in rows):
        rows = [{k: v for k, v in row.items() if k != "json"} for row in rows]
    dataset = Dataset.from_list(rows).cast_column("image", Image())
    return dataset.to_iterable_dataset() if streaming else dataset


def _find_img2dataset_samples(folder: Path, limit: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """`(key, {extension: path})` of the samples in `folder` and its sub-folders that have an image and a
    `.txt` or `.json` (img2dataset writes `00000/000000001.{jpg,txt,json}`)."""
    samples = []
    for directory in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        by_stem: dict[str, dict[str, str]] = {}
        for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
            stem, _, extension = entry.name.rpartition(".")
            if stem and entry.is_file():
                by_stem.setdefault(stem, {})[extension.lower()] = entry.path
        for stem, files in by_stem.items():
            has_image = any(extension in files for extension in IMAGE_EXTENSIONS)
            if has_image and ("txt" in files or "json" in files):
                key = stem if directory == folder else f"{directory.name}/{stem}"
                samples.append((key, files))
                if limit is not None and len(samples) >= limit:
                    return samples
    return samples


def _load_webdataset(
    shards: list[str], split: str, streaming: bool, image_column: str, text_column: str
) -> Dataset | IterableDataset:
    # datasets' own webdataset builder, run the way `load_dataset` runs it, but with shard-level fault tolerance.
    builder = _TolerantWebDataset(data_files={split: shards}, hash=Hasher.hash(_module_source()))
    if streaming:
        dataset = builder.as_streaming_dataset(split=split)
    else:
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split)
    features = dataset.features
    image_fields = [name for name, feature in features.items() if isinstance(feature, Image)]
    caption_fields = [name for name in dict.fromkeys((text_column, "txt")) if name in features]
    if not image_fields:
        raise ValueError(f"The samples of {shards[0]} have no image ({', '.join(IMAGE_EXTENSIONS)}): {list(features)}.")
    if not caption_fields and "json" not in features:
        raise ValueError(f"The samples of {shards[0]} have no caption (.txt or .json): {list(features)}.")

    # Images are passed through undecoded: a corrupt one must reach `validate_image_text_dataset`, not crash here.
    for name in image_fields:
        dataset = dataset.cast_column(name, Image(decode=False))
    removed = image_fields + [name for name in caption_fields if name not in image_fields]
    output_features = Features(
        {"image": Image(), "text": Value("string"), **{k: v for k, v in features.items() if k not in removed}}
    )
    kwargs = {"image_column": image_column, "text_column": text_column, "image_fields": image_fields}
    if isinstance(dataset, IterableDataset):
        # Typed afterwards with `cast`, not with `map(features=...)`: datasets does not decode the columns of a
        # stream typed by `map` again, so images would stay bytes.
        dataset = dataset.map(_normalize_sample, fn_kwargs=kwargs, remove_columns=removed)
        return dataset.cast(output_features)
    return dataset.map(
        _normalize_sample,
        fn_kwargs=kwargs,
        remove_columns=removed,
        features=output_features,
        new_fingerprint=_fingerprint(dataset, "normalize", kwargs),
        desc="Collecting images and captions",
    )


# What reading a damaged shard raises: tarfile on a cut or garbled archive, gzip / zlib / lzma on a cut or garbled
# compressed one (a truncated .tar.gz raises EOFError).
_SHARD_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
# The `__key__` suffix of the row that stands for the lost rest of a shard. datasets' webdataset loader splits a file
# name at the first dot of its last path component, so no real sample key has a dot there.
_TRUNCATION_SUFFIX = ".truncated"


class _TolerantWebDataset(WebDataset):
    """datasets' webdataset builder, except that a damaged shard does not end the whole dataset with a traceback that
    names no file. Reading stops at the damage, the samples before it are kept, and one marker row (every field
    `None`, `__key__` = the last sample read + `.truncated`, `__url__` = the shard) takes the place of the rest, so
    that validation counts and logs it like any other bad row (`TRUNCATED_SHARD`), streamed or cached.

    tarfile reads a tar cut exactly at a header block as a complete archive, so a plain `.tar` that read without error
    must also end with tar's end-of-archive marker (two zero blocks)."""

    def _generate_examples(self, tar_paths, tar_iterators):
        for tar_idx, (tar_path, tar_iterator) in enumerate(zip(tar_paths, tar_iterators)):
            example_idx, last_key, error = -1, None, None
            try:
                for key, example in super()._generate_examples([tar_path], [tar_iterator]):
                    example_idx, last_key = key.item_or_batch_id, example["__key__"]
                    yield Key(tar_idx, example_idx), example
            except _SHARD_READ_ERRORS as err:
                error = f"{type(err).__name__}: {err}"
            if error is None and not _ends_with_end_of_archive(tar_path):
                error = "the file ends without tar's end-of-archive marker"
            if error is not None:
                after = f"after sample {last_key}" if last_key is not None else "before its first sample"
                logger.warning(f"Shard {tar_path} is truncated or corrupt ({error}): skipping the rest of it, {after}.")
                marker = dict.fromkeys(self.info.features)
                marker.update({"__key__": f"{last_key or ''}{_TRUNCATION_SUFFIX}", "__url__": tar_path})
                yield Key(tar_idx, example_idx + 1), marker

    def _split_generators(self, dl_manager):
        try:
            return super()._split_generators(dl_manager)
        except _SHARD_READ_ERRORS as err:  # while inferring the fields from the first samples of the first shard
            shards = [path for paths in self.config.data_files.values() for path in paths]
            raise ValueError(
                f"The first shard {shards[0]} is truncated or corrupt within its first samples "
                f"({type(err).__name__}: {err}), from which the sample fields are inferred: re-download or remove it."
            ) from None


def _ends_with_end_of_archive(path: str) -> bool:
    """Whether a local uncompressed tar ends with its end-of-archive marker; `True` when that cannot be checked."""
    if not path.endswith(".tar") or not os.path.isfile(path):
        return True
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size % tarfile.BLOCKSIZE or size < 2 * tarfile.BLOCKSIZE:
            return False
        file.seek(size - 2 * tarfile.BLOCKSIZE)
        return not any(file.read(2 * tarfile.BLOCKSIZE))


def is_truncation_marker(key: Any) -> bool:
    return isinstance(key, str) and key.rpartition("/")[2].endswith(_TRUNCATION_SUFFIX)


def _normalize_sample(sample: dict, image_column: str, text_column: str, image_fields: list[str]) -> dict:
    images = {name: sample[name] for name in image_fields if sample.get(name) is not None}
    return {"image": _pick_image(images, image_column), "text": _pick_caption(sample, text_column)}


def _pick_image(images: dict[str, Any], preferred: str) -> Any:
    for name in (preferred, *IMAGE_EXTENSIONS, *images):
        if images.get(name) is not None:
            return images[name]
    return None


def _pick_caption(fields: dict[str, Any], text_column: str) -> str | None:
    """The sample's caption: its `text_column` or `txt` field, else its `.json`'s `text_column`, `caption` or
    `text` key."""
    metadata = fields.get("json") if isinstance(fields.get("json"), dict) else {}
    json_captions = (metadata.get(key) for key in (text_column, *JSON_CAPTION_KEYS))
    for caption in (fields.get(text_column), fields.get("txt"), *json_captions):
        # The first caption present wins, even empty: an empty `.txt` is an empty caption, to be counted.
        if caption is not None:
            return caption.strip() if isinstance(caption, str) else None
    return None


# Validation


def _validate_map_style(
    dataset: Dataset, image_column: str, text_column: str, num_proc: int | None
) -> tuple[Dataset, SkipReport]:
    undecoded = dataset
    if isinstance(dataset.features[image_column], Image):
        undecoded = dataset.cast_column(image_column, Image(decode=False))
    # `__key__` tells the marker row of a truncated shard (see `_TolerantWebDataset`) from an ordinary bad row.
    columns = [image_column, text_column] + (["__key__"] if "__key__" in dataset.column_names else [])
    checked = undecoded.select_columns(columns)
    # The reasons are data computed by `map` (cached, parallel with `num_proc`, with a progress bar), so the
    # counts are right even when `map` reads them back from its cache.
    reasons = checked.map(
        _skip_reasons,
        batched=True,
        input_columns=columns,
        remove_columns=columns,
        num_proc=num_proc,
        desc="Checking images and captions",
        new_fingerprint=_fingerprint(checked, "validate"),
    )["skip_reason"]
    keep, report = _rows_to_keep(reasons, undecoded, image_column)
    if not report.num_skipped:
        logger.info(f"Checked {report.num_rows} rows: every image decodes and every caption is non-empty.")
        return dataset, report
    logger.warning(f"Image-text data: {report.summary()}.")
    return dataset.select(keep), report


def _rows_to_keep(reasons: list[str | None], undecoded: Dataset, image_column: str) -> tuple[list[int], SkipReport]:
    """The rows without a skip reason, and the report counting the others (named by their image's file)."""
    report = SkipReport(num_rows=len(reasons))
    keep = []
    for row, reason in enumerate(reasons):
        if reason is None:
            keep.append(row)
        else:
            report.record(reason, lambda row=row: _where(undecoded[row], image_column, row))
    return keep, report


def drop_unreadable_images(
    dataset: Dataset, image_column: str = "image", name: str = "the data", num_proc: int | None = None
) -> tuple[Dataset, SkipReport]:
    """Drop the rows whose image is missing or cannot be decoded, and count them: the image-only check of
    `validate_image_text_dataset`, for data without captions (class-folder image sets). Skips are logged at warning
    level with a few of the files; `name` (e.g. "task 'mnist'") says whose images they are.

    Returns:
        `tuple[Dataset, SkipReport]`: the dataset without the bad rows (its features unchanged) and the report.
    """
    undecoded = dataset
    if isinstance(dataset.features[image_column], Image):
        undecoded = dataset.cast_column(image_column, Image(decode=False))
    checked = undecoded.select_columns([image_column])
    reasons = checked.map(
        _image_problems,
        batched=True,
        input_columns=[image_column],
        remove_columns=[image_column],
        num_proc=num_proc,
        desc=f"Checking the images of {name}",
        new_fingerprint=_fingerprint(checked, "validate-images"),
    )["skip_reason"]
    keep, report = _rows_to_keep(reasons, undecoded, image_column)
    if not report.num_skipped:
        return dataset, report
    logger.warning(f"Images of {name}: {report.summary()}.")
    return dataset.select(keep), report


def _image_problems(images: list) -> dict[str, list[str | None]]:
    return {"skip_reason": [_image_problem(image) for image in images]}


def _fingerprint(dataset: Dataset, step: str, *args) -> str:
    """The cache fingerprint of a `map` of this module. datasets hashes an importable function by its name, not
    its code, so a cache written by another version of this module would be read back; its source is hashed in."""
    return Hasher.hash((dataset._fingerprint, step, args, _module_source()))


@functools.cache
def _module_source() -> str:
    return Path(__file__).read_text(encoding="utf-8")


def _skip_reasons(images: list, texts: list, keys: list | None = None) -> dict[str, list[str | None]]:
    keys = keys if keys is not None else [None] * len(images)
    return {"skip_reason": [_skip_reason(image, text, key) for image, text, key in zip(images, texts, keys)]}


def _validate_streaming(
    dataset: IterableDataset, image_column: str, text_column: str
) -> tuple[IterableDataset, SkipReport]:
    report = SkipReport()
    features = dataset.features
    decodes_images = features is not None and isinstance(features[image_column], Image)
    if decodes_images:
        # The check must see undecoded images. The identity `map` leaves the stream untyped: datasets decodes a
        # stream's columns after `cast` only when the step before it is untyped, and `filter` would otherwise
        # inherit the `decode=False` typing, so images would come out as bytes.
        dataset = dataset.cast_column(image_column, Image(decode=False)).map()
    dataset = dataset.filter(_StreamingCheck(report, image_column, text_column))
    return (dataset.cast(features) if decodes_images else dataset), report


class _StreamingCheck:
    """The lazy filter of a stream. A class rather than a closure so that the dataset pickles into DataLoader
    workers started with spawn."""

    def __init__(self, report: SkipReport, image_column: str, text_column: str):
        self.report, self.image_column, self.text_column = report, image_column, text_column

    def __call__(self, row: dict) -> bool:
        self.report.num_rows += 1
        reason = _skip_reason(row[self.image_column], row[self.text_column], row.get("__key__"))
        if reason is None:
            return True
        where = _where(row, self.image_column, self.report.num_rows - 1)
        self.report.record(reason, lambda: where)
        skipped = self.report.num_skipped
        # Never silent, but a stream with many bad rows must not flood the log: the first rows, then 100, 1000...
        if skipped <= _LOG_EACH_FIRST or str(skipped).rstrip("0") == "1":
            logger.warning(f"Skipping {where} ({reason}); image-text stream so far: {self.report.summary()}.")
        return False


def _skip_reason(image: Any, text: Any, key: Any = None) -> str | None:
    if is_truncation_marker(key):
        return TRUNCATED_SHARD
    caption = first_caption(text)
    if not caption or not caption.strip():
        return MISSING_CAPTION
    return _image_problem(image)


def first_caption(text: Any) -> str | None:
    if isinstance(text, (list, tuple)):
        text = text[0] if text else None
    return text if isinstance(text, str) else None


def _image_problem(image: Any) -> str | None:
    """`None` if `image` (a `datasets.Image` storage dict, a path or a PIL image) decodes, else the reason."""
    if isinstance(image, PILImage.Image):
        return None
    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
    else:
        source = image
    if source is None:
        return MISSING_IMAGE
    try:
        with PILImage.open(source) as decoded:
            # A JPEG decoded at reduced scale still reads every byte, so truncation is caught at a fraction of
            # the cost; other formats ignore `draft`.
            decoded.draft("RGB", (64, 64))
            decoded.load()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... on bad files
        return UNREADABLE_IMAGE
    return None


def _where(row: dict, image_column: str, position: int) -> str:
    """A human pointer to a row for the logs: its image path, its sample key, or its position."""
    if is_truncation_marker(row.get("__key__")):
        last_key = row["__key__"][: -len(_TRUNCATION_SUFFIX)]
        return f"{row.get('__url__')}: the rest of the shard" + (f" after sample {last_key}" if last_key else "")
    image = row.get(image_column)
    if isinstance(image, dict) and image.get("path") and os.path.isabs(image["path"]):
        return image["path"]
    if row.get("__key__"):
        return f"{row.get('__url__') or ''}:{row['__key__']}".lstrip(":")
    return f"row {position}"

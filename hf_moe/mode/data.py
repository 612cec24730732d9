"""Which image-text pair is which, across MoDE's steps: caption reading for the embedding pass, pair keys, and the
fine cluster of each training row read back from `hf-moe mode cluster`'s assignments.

A pair key must identify a pair across the whole data set and stay the same between runs, whatever process or
order reads it:

- webdataset shards: the shard's path relative to the data root, `/`, the sample's `__key__` (`__key__` alone
  repeats across shards in MoDE's `{id % 100}/{id}.tar` layout, where every shard numbers its samples from 0);
- img2dataset: its `__key__` (`00000/000000001`), already relative to the folder;
- an image folder: the image file's path relative to the data root.

The data root is the deepest folder holding every shard (or image) file of the data set, so keys do not depend on
where the data lives or on how `--data` spells it (a folder, a glob or a brace pattern).
"""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from datasets import Dataset, Image, IterableDataset
from transformers.utils import logging

from ..data import detect_layout, first_caption, is_truncation_marker, load_image_text_dataset


logger = logging.get_logger(__name__)

ASSIGNMENTS_DIR = "assignments"


def source_root(paths: Iterable[str]) -> str:
    """The data root of a set of shard or image files: the deepest folder holding all of them."""
    folders = {os.path.dirname(os.path.realpath(path)) for path in paths}
    if not folders:
        raise ValueError("No shard or image file to take the data root from.")
    return os.path.commonpath(sorted(folders))


def pair_key(row: dict, root: str | None) -> str:
    """The key of an image-text pair (see the module docstring) from a row of `load_image_text_dataset`.

    Args:
        row (`dict`): The row; its `image` must be undecoded (a `{"path", "bytes"}` dict) for an image folder.
        root (`str`, *optional*): The data root (`source_root` of the data set's shards or images); unused for
            img2dataset rows.
    """
    if row.get("__url__") is not None:
        return f"{os.path.relpath(os.path.realpath(row['__url__']), root)}/{row['__key__']}"
    if row.get("__key__") is not None:
        return row["__key__"]
    image = row.get("image")
    path = image.get("path") if isinstance(image, dict) else getattr(image, "filename", None)
    if not path:
        raise ValueError(f"Cannot key a row without `__key__`, `__url__` or an image file path: {sorted(row)}.")
    return os.path.relpath(os.path.realpath(path), root)


def _undecoded(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """`dataset` without images decoded: keys and captions need none, and decoding dominates reading."""
    if isinstance(dataset.features.get("image"), Image):
        dataset = dataset.cast_column("image", Image(decode=False))
    return dataset


def dataset_pair_keys(dataset: Dataset) -> list[str]:
    """The pair key of every row of a map-style dataset from `load_image_text_dataset`, in row order, without
    decoding an image."""
    columns = dataset.column_names
    if "__url__" in columns:
        urls, keys = dataset["__url__"], dataset["__key__"]
        root = source_root(set(urls))
        return [pair_key({"__url__": url, "__key__": key}, root) for url, key in zip(urls, keys)]
    if "__key__" in columns:
        return list(dataset["__key__"])
    images = _undecoded(dataset.select_columns(["image"]))["image"]
    root = source_root(image["path"] for image in images)
    return [pair_key({"image": image}, root) for image in images]


def read_captions(data: str | Path) -> Iterator[tuple[str, str]]:
    """`(pair key, caption)` of every pair of `data` (any layout `load_image_text_dataset` reads), in a fixed order,
    without decoding an image. Pairs without a caption (and the rest of a truncated shard) are skipped and counted;
    a list of captions contributes its first, as `ImageTextCollator` does."""
    dataset = _undecoded(load_image_text_dataset(data, validate=False))
    columns = dataset.column_names
    root = None
    if "__url__" in columns:
        # Streamed shards: the root comes from the shard list, since the rows arrive one by one.
        root = source_root(detect_layout(data)[1])
    elif "__key__" not in columns:
        root = source_root(image["path"] for image in dataset.select_columns(["image"])["image"])
    wanted = [column for column in ("text", "__key__", "__url__", "image") if column in columns]
    skipped = 0
    for row in dataset.select_columns(wanted):
        caption = first_caption(row["text"])
        if is_truncation_marker(row.get("__key__")) or not caption or not caption.strip():
            skipped += 1
            continue
        yield pair_key(row, root), caption
    if skipped:
        logger.warning(f"Skipped {skipped} pairs of {data} without a caption (or in the lost rest of a bad shard).")


def read_assignments(clusters_dir: str | Path, columns: tuple[str, ...] = ("key", "fine", "coarse")):
    """The assignments of `hf-moe mode cluster` (`CLUSTERS_DIR/assignments/part-*.parquet`) as one pyarrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted((Path(clusters_dir) / ASSIGNMENTS_DIR).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(
            f"{Path(clusters_dir) / ASSIGNMENTS_DIR} holds no part-*.parquet: run `hf-moe mode cluster` into "
            f"{clusters_dir} first."
        )
    return pa.concat_tables(pq.read_table(part, columns=list(columns)) for part in parts)


class ClustersMismatchError(ValueError):
    """Training data whose pairs are not all in the clusters' assignments: the clusters were made from other data."""


def fine_labels_of(dataset: Dataset, clusters_dir: str | Path, data: str | Path | None = None) -> torch.LongTensor:
    """The fine cluster of each row of a map-style dataset from `load_image_text_dataset`, in row order, read from
    the assignments in `clusters_dir`.

    Raises:
        ClustersMismatchError: a row whose pair is not in the assignments (the first such key is named), with
            `data` (where the dataset was read from) named if given.
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("fine_labels_of needs a map-style dataset: load the data with `streaming=False`.")
    table = read_assignments(clusters_dir, ("key", "fine"))
    # A pandas index looks the keys up in C; a dict over hundreds of millions of keys would not fit in memory.
    fine = table.to_pandas().set_index("key")["fine"]
    keys = dataset_pair_keys(dataset)
    found = fine.reindex(keys)
    missing = found.isna().to_numpy()
    if missing.any():
        first = keys[int(missing.argmax())]
        source = f" of {data}" if data is not None else ""
        raise ClustersMismatchError(
            f"{int(missing.sum())} of {len(keys)} rows{source} are not in the assignments of {clusters_dir}, e.g. "
            f"pair key {first!r} (row {int(missing.argmax())}): the clusters were made from other data. Cluster the "
            "data you train on (`hf-moe mode cluster --data ...`) and pass those clusters."
        )
    return torch.from_numpy(found.to_numpy().astype("int64"))

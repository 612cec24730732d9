# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""LLaVA-format conversation data for MoIIE training, through the `datasets` library.

The JSON file is a list of samples

    [{"id": "0", "image": "file.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat digit is this?"},
                        {"from": "gpt", "value": "seven"}]}]

with image paths relative to an image folder; `"image"` may be one path, a list of paths (one `<image>`
placeholder each) or absent (text-only sample). Rows keep the image paths; images are opened only when a batch is
collated. `MoIIECollator` renders each conversation with the processor's chat template, expands each placeholder to
the image's tokens, and masks `labels` (-100) everywhere but the assistant turns (and padding).

`check_conversations` checks every sample before a job starts, with the collator's own tokenization, so a bad
sample is refused by name up front instead of failing (or silently training on nothing) hours into a run.
"""

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from transformers.utils import logging

from ..data import ALLOW_OUTSIDE_ENV


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Errors PIL raises for a file that is not a complete image of a known format.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _where(json_path, sample_id, field: str) -> str:
    return f"{json_path}: sample {sample_id!r}, field '{field}'"


def _image_list(value, where: str = "") -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"{where}: must be an image path or a list of image paths, got {value!r}.")
    return list(value)


def check_image_path(name: str, where: str, allow_outside: bool = False) -> None:
    """Refuse an absolute image path or one that climbs out of the image folder (`../`): a data file must not
    make training read arbitrary files of the machine, unless the user allows it explicitly."""
    if allow_outside:
        return
    normal = os.path.normpath(name)
    if Path(name).is_absolute() or os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        raise ValueError(
            f"{where}: image path {name!r} lies outside the image folder (absolute or '../'); image paths must "
            "be relative to --image_folder. Pass --allow_outside_image_paths to allow them."
        )


def turn_problem(conversations) -> tuple[str, str] | None:
    """(field, what is wrong) for the first malformed turn of a sample's `conversations`, or None."""
    if not isinstance(conversations, list):
        return "conversations", f"must be a list of turns, got {type(conversations).__name__} {conversations!r:.60}"
    for index, turn in enumerate(conversations):
        field = f"conversations[{index}]"
        if not isinstance(turn, dict):
            return field, f"must be a turn {{'from': ..., 'value': ...}}, got {turn!r:.60}"
        if turn.get("from") not in ROLES:
            got = "missing" if turn.get("from") is None else repr(turn.get("from"))
            return f"{field}.from", f"unknown role {got}; expected one of {sorted(ROLES)}"
        if not isinstance(turn.get("value"), str):
            got = "missing" if turn.get("value") is None else f"{type(turn['value']).__name__} {turn['value']!r:.60}"
            return f"{field}.value", f"must be the turn's text (a string), got {got}"
    return None


def _read_dataset(json_path: Path):
    """`datasets`' JSON loader, with a one-line error naming the file (and, for a JSON syntax error, the line and
    column) instead of a `DatasetGenerationError` traceback."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    if not json_path.is_file():
        raise FileNotFoundError(f"conversation data file '{json_path}' does not exist.")
    if json_path.stat().st_size == 0:
        raise ValueError(f"conversation data file '{json_path}' is empty: it is not a LLaVA-format conversation file.")
    try:
        return load_dataset("json", data_files=str(json_path), split="train")
    except DatasetGenerationError as err:
        reason = " ".join(str(err.__cause__ or err).split())
        try:  # the standard library names the line and column
            json.loads(json_path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as decode_error:
            reason = str(decode_error)
        raise ValueError(
            f"'{json_path}' is not a LLaVA-format conversation file (a JSON list of samples, or JSON Lines): {reason}."
        ) from err


def load_conversations(
    json_path: str | Path,
    image_folder: str | Path | None = None,
    check_images: bool = True,
    allow_outside_image_paths: bool | None = None,
):
    """The samples of a LLaVA-format JSON file as a `datasets.Dataset` with columns `id`, `images` (image paths,
    resolved against `image_folder`; empty for text-only samples) and `conversations`.

    Image paths must be relative and stay inside the folder (no absolute path, no `../` out of it) unless
    `allow_outside_image_paths` (default: the `HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS=1` environment variable, as for the
    image-caption folders of `hf_moe.data`). With `check_images`, every image file is checked to exist (no image is
    read), and a missing one raises a `FileNotFoundError` naming it and its sample. Data that is not JSON, a sample
    without `conversations` or with a malformed `image` field raise a `ValueError` naming the file, sample and field.
    """
    json_path = Path(json_path)
    if allow_outside_image_paths is None:
        allow_outside_image_paths = os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in ("1", "true", "yes")
    dataset = _read_dataset(json_path)
    if "conversations" not in dataset.column_names:
        raise ValueError(
            f"{_where(json_path, 0, 'conversations')}: missing; no sample of the file has one (columns: "
            f"{dataset.column_names}). Each sample needs a 'conversations' list of {{'from', 'value'}} turns."
        )
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    if check_images and not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' (of the images of {json_path}) is not a folder.")
    has_image = "image" in dataset.column_names

    def resolve(row, index):
        sample_id = row.get("id")
        sample_id = str(sample_id if sample_id is not None else index)
        if row["conversations"] is None:
            raise ValueError(f"{_where(json_path, sample_id, 'conversations')}: missing.")
        names = _image_list(row["image"] if has_image else None, _where(json_path, sample_id, "image"))
        for name in names:
            check_image_path(name, _where(json_path, sample_id, "image"), allow_outside_image_paths)
        return {"id": sample_id, "images": [str(folder / name) for name in names]}

    dataset = dataset.map(resolve, with_indices=True, remove_columns=["image"] if has_image else None)
    if check_images:
        for sample_id, images in zip(dataset["id"], dataset["images"]):
            for path in images:
                if not Path(path).is_file():
                    raise FileNotFoundError(
                        f"{_where(json_path, sample_id, 'image')}: image file {path} does not exist."
                    )
    return dataset


def check_image(path: str | Path, where: str) -> tuple[int, int]:
    """(width, height) of the image file `path`, after checking that it is complete without decoding it: PIL's
    `verify` (for a PNG, every chunk's checksum), and for a JPEG its end-of-image marker; a JPEG without one (cut
    off, or with data appended after the image) is decoded at 1/8 scale, which reads the whole stream. Raises an
    OSError naming `where` for a missing, truncated or corrupt file."""
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format != "JPEG":
                image.verify()
            elif not _ends_with_jpeg_eoi(path):
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file {path} does not exist.") from None
    except IMAGE_ERRORS as err:
        raise OSError(f"{where}: image file {path} is corrupt or truncated ({err}).") from err
    return size


def _ends_with_jpeg_eoi(path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-2, os.SEEK_END)
        return handle.read(2) == b"\xff\xd9"


def check_conversations(
    dataset,
    processor,
    json_path: str | Path,
    max_length: int | None = None,
    disable_progress: bool | None = None,
) -> dict[str, int]:
    """Check every sample of `load_conversations(json_path, ...)` the way training will read it, in one streaming
    pass with a progress bar, before a job starts:

    - each turn has a known `from` role and a string `value`, and `conversations` is a list;
    - each image file exists and is a complete image (`check_image`);
    - the `<image>` placeholders match the sample's images, and `max_length` does not cut into an image's tokens
      (`MoIIECollator.check`: the collator's own chat template and tokenization, so the check agrees with
      training, without expanding the images' tokens);
    - some sample has answer (assistant) tokens left after truncation: refuses data that would train on a loss of
      0, and warns with a count when only some samples have none.

    Raises a `ValueError` (an `OSError` for an image file) naming the file, the sample id and the field. Returns
    `{"samples": N, "without_answer": M}`.
    """
    from tqdm.auto import tqdm

    collator = MoIIECollator(processor, max_length=max_length)
    without_answer: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    total = 0
    for row in tqdm(dataset, desc=f"Checking {Path(json_path).name}", unit=" samples", disable=disable_progress):
        total += 1
        sample_id = row["id"]
        problem = turn_problem(row["conversations"])
        if problem is not None:
            field, reason = problem
            raise ValueError(f"{_where(json_path, sample_id, field)}: {reason}.")
        tokens = []
        for path in row["images"]:
            if path not in sizes:  # an image shared by several samples is read once
                sizes[path] = check_image(path, _where(json_path, sample_id, "image"))
            tokens.append(collator.tokens_for_size(*sizes[path]))
        try:
            has_answer = collator.check(row, tokens)
        except ValueError as err:
            field = "--max_length" if "max_length=" in str(err) else "conversations"
            raise ValueError(f"{_where(json_path, sample_id, field)}: {err}") from err
        if not has_answer:
            without_answer.append(sample_id)
    if total == 0:
        raise ValueError(f"'{json_path}' holds no samples.")
    cut = f", or --max_length={max_length} cuts every answer off" if max_length is not None else ""
    if len(without_answer) == total:
        raise ValueError(
            f"{json_path}: no sample has an answer token to train on (no 'gpt' / 'assistant' turn{cut}); the loss "
            f"would be 0 and nothing would be learned. Samples checked: {total}; first ids: {without_answer[:5]}."
        )
    if without_answer:
        logger.warning(
            f"{len(without_answer)} of {total} samples of {json_path} have no answer token (no 'gpt' / 'assistant' "
            f"turn{cut}) and add nothing to the loss; first ids: {without_answer[:5]}."
        )
    return {"samples": total, "without_answer": len(without_answer)}


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns (`from`: human / gpt) as chat-template messages (`role`: user / assistant)."""
    problem = turn_problem(conversations)
    if problem is not None:
        raise ValueError(f"'{problem[0]}': {problem[1]}.")
    return [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]


class MoIIECollator:
    """Rows of `load_conversations` -> `input_ids`, `attention_mask`, `token_type_ids`, `labels` and, when the batch
    holds images, `pixel_values` (images in sample order).

    Args:
        processor: a `MoIIEProcessor` (fast tokenizer, chat template, image processor).
        max_length: truncate longer samples; cutting into an image's tokens raises a `ValueError`.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("MoIIECollator needs a fast tokenizer (offset mappings locate the assistant turns).")
        self.max_length = max_length
        self.tokens_for_size = lru_cache(maxsize=1024)(self._tokens_for_size)

    def _tokens_for_size(self, width: int, height: int) -> int:
        """The tokens of a `width` x `height` image, as `__call__` counts them (from the processed image's size),
        without reading the image: from a blank one of its size, unless the processor gives a fixed count or
        resizes every image to one size."""
        processor, image_processor = self.processor, self.processor.image_processor
        if getattr(processor, "num_image_tokens", None) is not None:
            return processor.num_image_tokens
        size = getattr(image_processor, "size", None) or {}
        if getattr(image_processor, "do_resize", False) and "height" in size and "width" in size:
            return processor.tokens_per_image(int(size["height"]), int(size["width"]))
        pixels = image_processor([Image.new("RGB", (width, height))], return_tensors="pt")["pixel_values"][0]
        return processor.tokens_per_image(*map(int, pixels.shape[-2:]))

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _expand(self, text: str, tokens_per_image: list[int], start: int = 0) -> tuple[str, int]:
        """`text` with its placeholders expanded (the first being image `start`), and the next image index."""
        token = self.processor.image_token
        pieces = text.split(token)
        out = pieces[0]
        for offset, piece in enumerate(pieces[1:]):
            out += token * tokens_per_image[start + offset] + piece
        return out, start + len(pieces) - 1

    def check(self, row: dict, tokens_per_image: list[int]) -> bool:
        """Whether `row` keeps an answer (assistant) token after `max_length` truncation; raises the `ValueError`s
        `encode` would (turns, placeholder count, `max_length` cutting into an image), at a fraction of its cost.

        One chat-template render counts the placeholders; an assistant turn always has labelled tokens (`encode`
        labels its whole span). With `max_length`, the rendered text is tokenized with each placeholder left as its
        one token: `<image>` is an added token, which the tokenizer splits out before the text, so the text's tokens
        are those of the expanded sample, and the expanded length is that plus each image's other tokens. Only a
        sample longer than `max_length` then goes through `encode` (placeholders still unexpanded) to locate its
        answers and images against the cut.
        """
        try:
            messages = to_messages(row["conversations"])
        except ValueError as err:
            raise ValueError(f"Sample {row.get('id')!r}, field {err}") from None
        full = self._render(messages)
        self._check_placeholders(row, full, len(tokens_per_image))
        has_assistant = any(message["role"] == "assistant" for message in messages)
        if self.max_length is None:
            return has_assistant
        extra = sum(tokens_per_image) - len(tokens_per_image)
        if len(self.tokenizer(full, add_special_tokens=False)["input_ids"]) + extra <= self.max_length:
            return has_assistant
        max_length, self.max_length = self.max_length, None
        try:
            encoded = self.encode(row, [1] * len(tokens_per_image))
        finally:
            self.max_length = max_length
        input_ids, labels = encoded["input_ids"], encoded["labels"]
        image_id, position, image, answer = self.processor.image_token_id, 0, 0, False
        for token, label in zip(input_ids, labels):
            width = tokens_per_image[image] if token == image_id else 1
            if token == image_id:
                image += 1
                if position + width > max_length:  # `encode` refuses any image token past max_length
                    raise ValueError(self._cut_message(row, len(input_ids) + extra))
            elif label != IGNORE_INDEX and position < max_length:
                answer = True
            position += width
        return answer

    def _check_placeholders(self, row: dict, text: str, images: int) -> None:
        placeholders = text.count(self.processor.image_token)
        if placeholders != images:
            raise ValueError(
                f"Sample {row.get('id')!r} holds {placeholders} image placeholder(s) "
                f"{self.processor.image_token!r} but {images} image(s)."
            )

    def _cut_message(self, row: dict, length: int | None = None) -> str:
        long = f" is {length} tokens long;" if length is not None else ""
        return (
            f"Sample {row.get('id')!r}{long} max_length={self.max_length} would cut into its image tokens (an "
            "image is never truncated: raise --max_length, or shorten the sample)."
        )

    def encode(self, row: dict, tokens_per_image: list[int]) -> dict:
        """One sample: `input_ids` and `labels` (assistant-turn tokens only) as lists."""
        try:
            messages = to_messages(row["conversations"])
        except ValueError as err:
            raise ValueError(f"Sample {row.get('id')!r}, field {err}") from None
        full = self._render(messages)
        self._check_placeholders(row, full, len(tokens_per_image))
        expanded, _ = self._expand(full, tokens_per_image)
        # Character spans (in the expanded text) of each assistant turn: from the end of the prompt that asks for
        # it (the generation prompt) to the end of the conversation rendered up to and including it.
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            upto = self._render(messages[: index + 1])
            if not (full.startswith(prompt) and full.startswith(upto)):
                raise ValueError("The chat template does not render conversations prefix by prefix.")
            begin = len(self._expand(prompt, tokens_per_image)[0])
            end = len(self._expand(upto, tokens_per_image)[0])
            spans.append((begin, end))
        encoding = self.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        labels = [
            token if end > start and any(b <= start < e for b, e in spans) else IGNORE_INDEX
            for token, (start, end) in zip(input_ids, encoding["offset_mapping"])
        ]
        if self.max_length is not None and len(input_ids) > self.max_length:
            image_id = self.processor.image_token_id
            if input_ids.count(image_id) != input_ids[: self.max_length].count(image_id):
                raise ValueError(self._cut_message(row, len(input_ids)))
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def _open(self, path: str, sample_id) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"Image file {path} of sample {sample_id!r} does not exist.") from None
        except IMAGE_ERRORS as err:
            raise OSError(f"Image file {path} of sample {sample_id!r} is corrupt or truncated ({err}).") from err

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [self._open(path, row.get("id")) for row in rows for path in row.get("images") or []]
        pixel_values = None
        tokens = []
        if images:
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            tokens = [self.processor.tokens_per_image(*map(int, pixels.shape[-2:])) for pixels in pixel_values]
        encoded, start = [], 0
        for row in rows:
            count = len(row.get("images") or [])
            encoded.append(self.encode(row, tokens[start : start + count]))
            start += count
        length = max(len(sample["input_ids"]) for sample in encoded)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = self.tokenizer.padding_side == "left"
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for sample in encoded:
            n = length - len(sample["input_ids"])
            for key, values, fill in (
                ("input_ids", sample["input_ids"], pad_id),
                ("attention_mask", [1] * len(sample["input_ids"]), 0),
                ("labels", sample["labels"], IGNORE_INDEX),
            ):
                batch[key].append([fill] * n + values if left else values + [fill] * n)
        out = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        is_image = out["input_ids"] == self.processor.image_token_id
        out["token_type_ids"] = (is_image & out["attention_mask"].bool()).long()
        if pixel_values is not None:
            out["pixel_values"] = pixel_values
        return out


__all__ = [
    "IGNORE_INDEX",
    "MoIIECollator",
    "check_conversations",
    "check_image",
    "check_image_path",
    "load_conversations",
    "to_messages",
    "turn_problem",
]

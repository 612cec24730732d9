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
"""

from pathlib import Path

import torch
from PIL import Image


IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _image_list(value) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def load_conversations(json_path: str | Path, image_folder: str | Path | None = None, check_images: bool = True):
    """The samples of a LLaVA-format JSON file as a `datasets.Dataset` with columns `id`, `images` (image paths,
    resolved against `image_folder`; empty for text-only samples) and `conversations`.

    With `check_images`, every image file is checked to exist (no image is read), and a missing one raises a
    `FileNotFoundError` naming it and its sample.
    """
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(json_path), split="train")
    folder = Path(image_folder) if image_folder is not None else Path(json_path).parent
    has_image = "image" in dataset.column_names

    def resolve(row, index):
        images = [str(folder / name) for name in _image_list(row["image"] if has_image else None)]
        sample_id = row.get("id")
        return {"id": str(sample_id if sample_id is not None else index), "images": images}

    dataset = dataset.map(resolve, with_indices=True, remove_columns=["image"] if has_image else None)
    if check_images:
        for sample_id, images in zip(dataset["id"], dataset["images"]):
            for path in images:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"Image file {path} of sample {sample_id!r} does not exist.")
    return dataset


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns (`from`: human / gpt) as chat-template messages (`role`: user / assistant)."""
    messages = []
    for turn in conversations:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"Unknown conversation role {turn['from']!r}; expected one of {sorted(ROLES)}.")
        messages.append({"role": role, "content": turn["value"]})
    return messages


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

    def encode(self, row: dict, tokens_per_image: list[int]) -> dict:
        """One sample: `input_ids` and `labels` (assistant-turn tokens only) as lists."""
        messages = to_messages(row["conversations"])
        full = self._render(messages)
        placeholders = full.count(self.processor.image_token)
        if placeholders != len(tokens_per_image):
            raise ValueError(
                f"Sample {row.get('id')!r} holds {placeholders} image placeholder(s) "
                f"{self.processor.image_token!r} but {len(tokens_per_image)} image(s)."
            )
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
                raise ValueError(
                    f"Sample {row.get('id')!r} is {len(input_ids)} tokens long; max_length={self.max_length} would "
                    "cut into its image tokens."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def _open(self, path: str, sample_id) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"Image file {path} of sample {sample_id!r} does not exist.") from None

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


__all__ = ["IGNORE_INDEX", "MoIIECollator", "load_conversations", "to_messages"]

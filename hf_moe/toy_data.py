"""Small real image data sets built from scikit-learn's bundled handwritten digits (no download).

Written in the layouts users bring, so every data path runs on them: an image folder with captions in
`metadata.jsonl` (datasets' imagefolder convention) and an image folder with one sub-folder per class.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a small grey picture of a {name}",
    "a scanned {name}, drawn with a pen",
]


def digit_images(count: int, size: int = 32, offset: int = 0) -> tuple[list[Image.Image], list[int]]:
    """`count` of scikit-learn's 8x8 digits (1797 in all), upscaled to `size` RGB images, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = [(offset + i) % len(digits.target) for i in range(count)]
    images = [
        Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).convert("RGB").resize((size, size))
        for i in indices
    ]
    return images, [int(digits.target[i]) for i in indices]


def digit_caption(label: int, variant: int) -> str:
    template = CAPTION_TEMPLATES[variant % len(CAPTION_TEMPLATES)]
    return template.format(name=DIGIT_NAMES[label], digit=label)


def save_digit_caption_folder(
    output_dir: str | Path, count: int = 64, size: int = 32, offset: int = 0, captions_per_image: int = 1
) -> Path:
    """An image folder with `metadata.jsonl` rows `{"file_name", "text"}` (a list of captions when
    `captions_per_image > 1`, for retrieval evaluation)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(count, size, offset)
    with open(output_dir / "metadata.jsonl", "w") as metadata:
        for i, (image, label) in enumerate(zip(images, labels)):
            file_name = f"{i:05d}.png"
            image.save(output_dir / file_name)
            captions = [digit_caption(label, i + j) for j in range(captions_per_image)]
            text = captions[0] if captions_per_image == 1 else captions
            metadata.write(json.dumps({"file_name": file_name, "text": text, "label": label}) + "\n")
    return output_dir


def save_digit_class_folders(output_dir: str | Path, count: int = 50, size: int = 32, offset: int = 0) -> Path:
    """An image folder with one sub-folder per class named by the digit's word (`zero/`, `one/`, ...)."""
    output_dir = Path(output_dir)
    images, labels = digit_images(count, size, offset)
    for i, (image, label) in enumerate(zip(images, labels)):
        class_dir = output_dir / DIGIT_NAMES[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"{i:05d}.png")
    return output_dir

"""Small real image data sets built from scikit-learn's bundled handwritten digits (no download).

Written in the layouts users bring, so every data path runs on them: an image folder with captions in
`metadata.jsonl` (datasets' imagefolder convention) and an image folder with one sub-folder per class.
"""

import functools
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
    digits = _load_digits()
    indices = [(offset + i) % len(digits.target) for i in range(count)]
    return digit_images_at(indices, size), [int(digits.target[i]) for i in indices]


def digit_images_at(indices, size: int = 32) -> list[Image.Image]:
    """The digits at `indices` (0 to 1796) as `size` x `size` RGB images."""
    pixels = _load_digits().images
    return [
        Image.fromarray((pixels[i] * (255 / 16)).astype(np.uint8)).convert("RGB").resize((size, size)) for i in indices
    ]


@functools.cache
def _load_digits():
    from sklearn.datasets import load_digits

    return load_digits()


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


# Described digits: captions that name two visible attributes besides the digit, so that retrieval on held-out
# images is well posed (class-only captions repeat across the ~180 images of a class, each of which would then be
# an equally right answer). Each attribute is cut at the terciles of its class, so every (digit, ink, width)
# combination occurs.
INK_WORDS = ("light", "medium", "heavy")
WIDTH_WORDS = ("narrow", "regular", "wide")
DESCRIBED_TEMPLATES = (
    "a {ink} {width} {name}",
    "a handwritten {name}, {ink} and {width}",
    "the digit {name} drawn {ink} and {width}",
    "a handwritten digit {name}",
)
NUM_DIGITS = 1797


@functools.cache
def digit_attributes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label, ink tercile (0-2) and width tercile (0-2) within the class, of each of the 1797 digits."""
    digits = _load_digits()
    pixels, labels = digits.images, digits.target.astype(int)
    ink = pixels.sum(axis=(1, 2))
    weights = pixels / ink[:, None, None]
    columns = np.arange(pixels.shape[2])[None, None, :]
    mean_x = (weights * columns).sum(axis=(1, 2))
    width = np.sqrt((weights * (columns - mean_x[:, None, None]) ** 2).sum(axis=(1, 2)))

    def terciles(values):
        bins = np.zeros(len(values), dtype=int)
        for label in range(10):
            members = labels == label
            cuts = np.quantile(values[members], [1 / 3, 2 / 3])
            bins[members] = np.searchsorted(cuts, values[members], side="right")
        return bins

    return labels, terciles(ink), terciles(width)


def describe_digit(index: int, variant: int = 0) -> str:
    """A caption of digit `index` naming its ink and width; `variant` picks one of `DESCRIBED_TEMPLATES` (the last
    names the digit only, so that class-only prompts are in the training distribution)."""
    labels, ink, width = digit_attributes()
    template = DESCRIBED_TEMPLATES[variant % len(DESCRIBED_TEMPLATES)]
    return template.format(name=DIGIT_NAMES[labels[index]], ink=INK_WORDS[ink[index]], width=WIDTH_WORDS[width[index]])


def save_described_digit_folder(output_dir: str | Path, indices, size: int = 32, seed: int = 0) -> Path:
    """An image folder (`metadata.jsonl` rows `file_name`, `text`, `label`) of the digits at `indices`, each
    captioned by `describe_digit` with a template drawn at random (seeded)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    variants = np.random.default_rng(seed).integers(len(DESCRIBED_TEMPLATES), size=len(indices))
    labels = digit_attributes()[0]
    with open(output_dir / "metadata.jsonl", "w") as metadata:
        for position, (index, image, variant) in enumerate(zip(indices, digit_images_at(indices, size), variants)):
            file_name = f"{position:05d}.png"
            image.save(output_dir / file_name)
            row = {"file_name": file_name, "text": describe_digit(index, int(variant)), "label": int(labels[index])}
            metadata.write(json.dumps(row) + "\n")
    return output_dir


def digit_classification_dataset(indices, size: int = 32):
    """A `datasets.Dataset` (`image`, `label` with the digit words as class names) for zero-shot evaluation."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})
    indices = list(indices)
    labels = [int(label) for label in digit_attributes()[0][indices]]
    return datasets.Dataset.from_dict({"image": digit_images_at(indices, size), "label": labels}, features=features)


def digit_retrieval_dataset(indices, size: int = 32):
    """A `datasets.Dataset` (`image`, `text`) holding, for each (digit, ink, width) description met among `indices`,
    the first such image with that description as its one caption: every caption has exactly one right image."""
    import datasets

    chosen, seen = [], set()
    for index in indices:
        caption = describe_digit(index)
        if caption not in seen:
            seen.add(caption)
            chosen.append(index)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    captions = [describe_digit(index) for index in chosen]
    return datasets.Dataset.from_dict({"image": digit_images_at(chosen, size), "text": captions}, features=features)


def described_digit_words() -> list[str]:
    """Every word of the described-digit captions and prompts (whole-word tokens for `save_toy_clip(words=...)`)."""
    texts = [*DESCRIBED_TEMPLATES, *DIGIT_NAMES, *INK_WORDS, *WIDTH_WORDS]
    words = {word for text in texts for word in text.replace(",", " ").split() if word.isalnum()}
    return sorted(words)

"""Small image-classification tasks built without any download: real images shipped in PyPI packages
(scikit-learn's handwritten digits and its two sample photographs) plus generated ones (shapes, stripe
patterns), for multi-task merging experiments (WEMoE, AdaMerging, TIES, ...).

Every task is deterministic given its seed, class-balanced, small (`size` x `size` RGB, 32 by default) and
has disjoint train and test splits. It is available in memory (`ImageTask.images/labels/dataset`) and as a
class-folder image set (`save_task_folders`), the layout `hf-moe eval zero-shot` and the TTA commands read:
one sub-folder per class, named by the class name with `_` for spaces. Class names are kept in sorted order so
that the label ids of the folders (datasets' imagefolder sorts them) equal the in-memory ones.

Tasks (`TASK_NAMES`):

* `digits`: scikit-learn's 1,797 8x8 handwritten digits (real), 10 classes named by the digit's word;
  at most 174 images per class in all (the smallest class has 174).
* `photos`: random crops of scikit-learn's two sample photographs (real: `china.jpg`, a temple, and
  `flower.jpg`), 2 classes; train crops come from the left 75 % of each photo, test crops from the right
  25 %, so no test pixel is seen in training.
* `shapes`: a filled circle, cross, square or triangle (generated), random size, position and colours.
* `patterns`: checkered, diagonal, horizontal or vertical stripes (generated), random period, phase, colours.
"""

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


SPLITS = ("train", "test")
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TASK_CLASSES = {
    "digits": sorted(DIGIT_WORDS),
    "photos": ["flower", "temple"],
    "shapes": ["circle", "cross", "square", "triangle"],
    "patterns": ["checkered", "diagonal stripes", "horizontal stripes", "vertical stripes"],
}
TASK_NAMES = tuple(TASK_CLASSES)
TASK_TEMPLATES = {
    "digits": ("a photo of the number: {}.", "a handwritten digit {}.", "a {}."),
    "photos": ("a photo of a {}.", "a crop of a photo of a {}.", "a {}."),
    "shapes": ("a {}.", "a drawing of a {}.", "a {} shape."),
    "patterns": ("{}.", "a pattern of {}.", "a texture of {}."),
}
MAX_DIGITS_PER_CLASS = 174


@dataclass
class ImageTask:
    """One classification task: class names (sorted, label ids index them), zero-shot templates and its splits."""

    name: str
    class_names: list[str]
    templates: tuple[str, ...]
    splits: dict[str, tuple[list[Image.Image], list[int]]] = field(repr=False)
    seed: int = 0

    def images(self, split: str) -> list[Image.Image]:
        return self.splits[_check_split(split)][0]

    def labels(self, split: str) -> list[int]:
        return self.splits[_check_split(split)][1]

    def dataset(self, split: str):
        """A `datasets.Dataset` (`image`, `label` as a ClassLabel named by the class folders) of one split."""
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=self.folder_names)})
        return datasets.Dataset.from_dict({"image": self.images(split), "label": self.labels(split)}, features=features)

    @property
    def folder_names(self) -> list[str]:
        return [name.replace(" ", "_") for name in self.class_names]

    def __len__(self) -> int:
        return sum(len(labels) for _, labels in self.splits.values())


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; choose one of {SPLITS}.")
    return split


def build_task(
    name: str, train_per_class: int = 64, test_per_class: int = 32, size: int = 32, seed: int = 0
) -> ImageTask:
    """The task `name` (one of `TASK_NAMES`) with `train_per_class` / `test_per_class` images of every class."""
    if name not in TASK_CLASSES:
        raise ValueError(f"Unknown task '{name}'; choose one of {list(TASK_NAMES)}.")
    if train_per_class < 1 or test_per_class < 1 or size < 8:
        raise ValueError("train_per_class and test_per_class must be >= 1 and size >= 8.")
    if name == "digits" and train_per_class + test_per_class > MAX_DIGITS_PER_CLASS:
        raise ValueError(f"digits has {MAX_DIGITS_PER_CLASS} images per class: train + test per class must fit.")
    # One generator per (task, seed): tasks do not shift each other's draws.
    rng = np.random.default_rng([seed, TASK_NAMES.index(name)])
    counts = {"train": train_per_class, "test": test_per_class}
    splits = _BUILDERS[name](rng, counts, size)
    return ImageTask(name, list(TASK_CLASSES[name]), TASK_TEMPLATES[name], splits, seed)


def build_tasks(names=TASK_NAMES, **kwargs) -> dict[str, ImageTask]:
    return {name: build_task(name, **kwargs) for name in names}


def save_task_folders(task: ImageTask, output_dir: str | os.PathLike, split: str) -> Path:
    """Write one split as a class-folder image set: `output_dir/<class folder>/<index>.png`. Returns the folder."""
    output_dir = Path(output_dir)
    for folder in task.folder_names:
        (output_dir / folder).mkdir(parents=True, exist_ok=True)
    folders = task.folder_names
    for index, (image, label) in enumerate(zip(task.images(split), task.labels(split))):
        image.save(output_dir / folders[label] / f"{index:05d}.png")
    return output_dir


# ----------------------------------------------------------------------------------------------------------
# Builders: (rng, {split: per-class count}, size) -> {split: (images, labels)}, labels indexing TASK_CLASSES
# ----------------------------------------------------------------------------------------------------------


def _interleave(per_class: list[list[Image.Image]]) -> tuple[list[Image.Image], list[int]]:
    """Class 0, 1, ..., K-1, 0, 1, ...: balanced at every prefix."""
    images, labels = [], []
    for position in range(len(per_class[0])):
        for label, members in enumerate(per_class):
            images.append(members[position])
            labels.append(label)
    return images, labels


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def _digits_task(rng, counts, size):
    digits = _digits()
    classes = TASK_CLASSES["digits"]
    per_split = {split: [] for split in SPLITS}
    for name in classes:
        members = np.flatnonzero(digits.target == DIGIT_WORDS.index(name))
        members = rng.permutation(members)
        chosen = {"train": members[: counts["train"]], "test": members[counts["train"] :][: counts["test"]]}
        for split in SPLITS:
            per_split[split].append([_digit_image(digits.images[i], size) for i in chosen[split]])
    return {split: _interleave(per_split[split]) for split in SPLITS}


def _digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray((pixels * (255 / 16)).astype(np.uint8)).convert("RGB").resize((size, size))


@functools.cache
def _sample_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    by_file = {Path(path).stem: image for path, image in zip(photos.filenames, photos.images)}
    return {"temple": by_file["china"], "flower": by_file["flower"]}


def _photos_task(rng, counts, size):
    photos = _sample_photos()
    per_split = {split: [] for split in SPLITS}
    for name in TASK_CLASSES["photos"]:
        photo = photos[name]
        height, width = photo.shape[:2]
        boundary = int(width * 0.75)
        regions = {"train": (0, boundary), "test": (boundary, width)}
        for split in SPLITS:
            left, right = regions[split]
            crops = []
            for _ in range(counts[split]):
                crop = int(rng.integers(48, min(128, right - left) + 1))
                x = int(rng.integers(left, right - crop + 1))
                y = int(rng.integers(0, height - crop + 1))
                patch = photo[y : y + crop, x : x + crop]
                if rng.random() < 0.5:
                    patch = patch[:, ::-1]
                crops.append(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR))
            per_split[split].append(crops)
    return {split: _interleave(per_split[split]) for split in SPLITS}


def _two_colours(rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and a background colour that differ clearly in brightness."""
    while True:
        foreground, background = rng.integers(0, 256, size=(2, 3))
        if abs(int(foreground.mean()) - int(background.mean())) >= 60:
            return tuple(int(c) for c in foreground), tuple(int(c) for c in background)


def _add_noise(rng, image: Image.Image, scale: float = 12.0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, scale, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _shape_image(rng, name: str, size: int) -> Image.Image:
    scale = 4  # drawn large, then downsampled: anti-aliased edges
    canvas = size * scale
    foreground, background = _two_colours(rng)
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.4) * canvas
    cx, cy = rng.uniform(radius, canvas - radius, size=2)
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=foreground)
    elif name == "square":
        half = radius * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=foreground)
    elif name == "triangle":
        angle = rng.uniform(0, 2 * np.pi)
        corners = angle + np.arange(3) * 2 * np.pi / 3
        points = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in corners]
        draw.polygon(points, fill=foreground)
    elif name == "cross":
        arm = radius * 0.3
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=foreground)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=foreground)
    return _add_noise(rng, image.resize((size, size), Image.LANCZOS))


def _pattern_image(rng, name: str, size: int) -> Image.Image:
    foreground, background = _two_colours(rng)
    period = rng.uniform(size / 8, size / 3)
    phase = rng.uniform(0, period)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    if name == "horizontal stripes":
        coordinate = ys
    elif name == "vertical stripes":
        coordinate = xs
    elif name == "diagonal stripes":
        coordinate = (xs + ys if rng.random() < 0.5 else xs - ys) / np.sqrt(2)
    else:  # checkered
        coordinate = None
    if coordinate is None:
        mask = ((np.floor((xs + phase) / period) + np.floor((ys + phase) / period)) % 2).astype(bool)
    else:
        mask = ((coordinate + phase) % period) < period / 2
    pixels = np.where(mask[..., None], np.array(foreground), np.array(background)).astype(np.uint8)
    return _add_noise(rng, Image.fromarray(pixels))


def _generated_task(draw):
    def build(rng, counts, size, task):
        return {
            split: _interleave([[draw(rng, name, size) for _ in range(counts[split])] for name in TASK_CLASSES[task]])
            for split in SPLITS
        }

    return build


_BUILDERS = {
    "digits": _digits_task,
    "photos": _photos_task,
    "shapes": lambda rng, counts, size: _generated_task(_shape_image)(rng, counts, size, "shapes"),
    "patterns": lambda rng, counts, size: _generated_task(_pattern_image)(rng, counts, size, "patterns"),
}

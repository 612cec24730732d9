"""Zero-shot classification and image-text retrieval evaluation of CLIP-like models.

Works for transformers' dense `CLIPModel` and every CLIP-like model of hf-moe: anything with
`get_image_features(pixel_values=...)` and `get_text_features(input_ids=..., attention_mask=...)`, returning
either the projected embeddings or an output whose `pooler_output` holds them (transformers 5). A task-weighted
ensemble of CLIP experts (MoDE: `experts`, `clustering_embeddings`, `task_weights`) is scored as the model's own
zero-shot classification is: each expert's cosine similarities, summed with the task weights of the class names.
Metrics go through `evaluate` with the local metric scripts in `hf_moe/metrics` (no Hub access).

    hf-moe eval zero-shot --model MODEL --data CLASS_FOLDERS [--class_names imagenet|cifar10|cifar100|FILE]
        [--templates auto|default|imagenet|FILE] [--output FILE]
    hf-moe eval zero-shot --model MODEL --data uoft-cs/cifar100 --split test --image_column img \\
        --label_column fine_label   (a Hub id; the ClassLabel's names are the class names)
    hf-moe eval zero-shot --model TTA_OUTPUT --data TASK_FOLDER --task TASK   (the heads tta-wemoe adapted with)
    hf-moe eval retrieval --model MODEL --data CAPTIONED_FOLDER [--max_captions_per_image 5] [--k_values 1 5 10]
        [--output FILE]
    hf-moe eval suite --model MODEL --suite ta8   (hf_moe.eval_suites)

`--data` is any source `hf_moe.eval_data.load_eval_dataset` reads: a Hub dataset id (with `--dataset_config`,
`--split`), a `save_to_disk` folder, parquet files (a file, a glob, a folder) or an image folder; `--image_column`,
`--label_column`, `--caption_column` name the source columns. Zero-shot reports top-1 and mean per-class accuracy.

`--output` defaults to `<MODEL>/eval_<task>.json` when MODEL is a local folder, else `./eval_<task>.json`. Models
load with `trust_remote_code=False` unless `--trust_remote_code` is given (hf-moe's own models need no remote code
where hf-moe is installed).
"""

import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .arguments import parse_command_line
from .class_names import CLASS_NAME_SETS, resolve_class_names
from .eval_data import load_eval_dataset
from .fileio import atomic_output_file
from .loading import device_option, dtype_option
from .metrics import load_metric


logger = logging.get_logger(__name__)


# OpenAI's 80 prompt templates for ImageNet (CLIP repository, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# A compact, domain-neutral ensemble (a subset of the above): photo-style prompts with no ImageNet-specific
# renditions (origami, plushie, video game, ...), cheap enough for any class count.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
    "itap of a {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_TEMPLATES, "imagenet": IMAGENET_TEMPLATES}
# "auto" (the default): OpenAI's 80 templates with OpenAI's ImageNet class names, as CLIP was evaluated.
AUTO_TEMPLATES = "auto"
RETRIEVAL_K: tuple[int, ...] = (1, 5, 10)
# The COCO and Flickr30k retrieval protocols use 5 captions per image; COCO has images with 6 or 7.
MAX_CAPTIONS_PER_IMAGE = 5
# {task: {"class_names": [...], "templates": [...]}}: the zero-shot heads a model was adapted with (tta-wemoe).
ZERO_SHOT_HEADS_FILE = "zero_shot_heads.json"


def write_zero_shot_heads(folder: str | os.PathLike, class_names: dict, templates: dict) -> Path:
    """Write `{task: {"class_names", "templates"}}` to `folder/zero_shot_heads.json`: what a model's zero-shot heads
    were built from, read back by `read_zero_shot_heads` (`hf-moe eval zero-shot --task`)."""
    heads = {
        task: {"class_names": list(names), "templates": list(templates[task])} for task, names in class_names.items()
    }
    path = Path(folder) / ZERO_SHOT_HEADS_FILE
    path.write_text(json.dumps(heads, indent=1) + "\n")
    return path


def read_zero_shot_heads(folder: str | os.PathLike, task: str) -> tuple[list[str], list[str]]:
    """The class names and templates of `task` in `folder/zero_shot_heads.json`; an error naming the file otherwise."""
    path = Path(folder).expanduser() / ZERO_SHOT_HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--task {task}: '{path}' does not exist (hf-moe tta-wemoe writes it in the folder of the model it adapts; "
            "--task needs that local folder as --model)."
        )
    try:
        heads = json.loads(path.read_text(encoding="utf-8"))
        entry = heads.get(task) if isinstance(heads, dict) else None
    except ValueError as err:
        raise ValueError(f"'{path}' is not valid JSON: {err}") from err
    if entry is None:
        known = sorted(heads) if isinstance(heads, dict) else []
        raise ValueError(f"--task '{task}' is not a task of '{path}', which holds {known}.")
    if not isinstance(entry, dict) or not entry.get("class_names") or not entry.get("templates"):
        raise ValueError(f"'{path}': task '{task}' needs non-empty 'class_names' and 'templates' lists.")
    return list(entry["class_names"]), list(entry["templates"])


# --------------------------------------------------------------------------------------------------------------
# Options: the configuration of the evaluation functions and of `hf-moe eval` alike (one declaration of each
# default; the functions' keyword defaults are read from these classes, tests/test_option_defaults.py checks both)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "CLIP-like model: a local folder or Hub id."})
    data: str = field(
        metadata={
            "help": "The data: a Hub dataset id (e.g. tanganke/dtd), a save_to_disk folder, parquet file(s) (a file, "
            "a glob such as 'data/test-*.parquet', or a folder of them: a dataset repository), or an image folder "
            "(class sub-folders; images + metadata.jsonl captions for retrieval)."
        }
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": "JSON file for the results (default: MODEL/eval_<task>.json for a local MODEL folder, "
            "else ./eval_<task>.json)."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Images or texts per forward pass."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype, e.g. bfloat16 (default: as saved)."})
    split: str | None = field(
        default=None,
        metadata={"help": "Split, when the data has several (default: test, else validation, else the only one)."},
    )
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "Dataset configuration (Hub ids and dataset repositories), e.g. cropped_digits."},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "The data's image column (default: image, else img)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the model code shipped in the model folder or repo. hf-moe's own models do not need it "
            "where hf-moe is installed; only pass it for code you trust."
        },
    )


@dataclass
class ZeroShotEvalArguments(EvalArguments):
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "The data's class-id column (default: label), e.g. fine_label for CIFAR-100; a ClassLabel gives "
            "the class names."
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": f"Class names: {', '.join(CLASS_NAME_SETS)} (shipped; class folders matched by WordNet id such "
            "as n01440764, label id or name), or a file: one name per line in folder order, or JSON mapping "
            "folder -> name. Default: the folder names, with ImageNet synset folders mapped to OpenAI's names."
        },
    )
    templates: str = field(
        default=AUTO_TEMPLATES,
        metadata={
            "help": "Prompt templates: 'auto' (OpenAI's 80 ImageNet templates with the ImageNet class names, "
            "else 'default'), 'default' (8), 'imagenet' (OpenAI's 80) or a text file with one template per line, "
            "'{}' standing for the class name."
        },
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": f"A task of MODEL/{ZERO_SHOT_HEADS_FILE} (hf-moe tta-wemoe writes it): evaluate with the class "
            "names and templates MODEL was adapted with on that task, instead of --class_names / --templates."
        },
    )


@dataclass
class RetrievalEvalArguments(EvalArguments):
    caption_column: str | None = field(
        default=None,
        metadata={
            "help": "The data's caption column: a caption or a list of captions per image (default: text, else "
            "caption, else captions)."
        },
    )
    max_captions_per_image: int = field(
        default=MAX_CAPTIONS_PER_IMAGE,
        metadata={
            "help": "Score the first N non-empty captions of each image, as the COCO / Flickr30k protocols (5); 0: all."
        },
    )
    k_values: list[int] = field(
        default_factory=lambda: list(RETRIEVAL_K),
        metadata={"help": "The recall cut-offs k (R@k of both directions)."},
    )


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_image_dataset(data, split: str | None = None):
    """A `datasets.Dataset` with an `image` column from any source `hf_moe.eval_data.load_eval_dataset` reads (an
    image folder, a `DatasetDict` / `Dataset`, a save_to_disk folder, parquet files, a dataset repository or a Hub
    id). With several splits, `split` picks one (default: `test`, else `validation`, else the only one)."""
    return load_eval_dataset(data, split)


def to_rgb_image(image) -> Image.Image:
    """An RGB PIL image from a datasets `image` value: a PIL image, a path, or a `{"bytes"/"path"}` row."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (str, os.PathLike)):
        pil = Image.open(image)
    elif isinstance(image, dict) and (image.get("bytes") or image.get("path")):  # datasets.Image(decode=False)
        import io

        pil = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    else:
        raise TypeError(f"Cannot read an image from a {type(image).__name__}.")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def _image_batches(dataset, batch_size: int) -> Iterator[list[Image.Image]]:
    for batch in dataset.select_columns(["image"]).iter(batch_size=batch_size):
        yield [to_rgb_image(image) for image in batch["image"]]


# --------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------


def projected_embeddings(output) -> torch.Tensor:
    """The projected embeddings from a `get_*_features` return: a tensor, or an output with `pooler_output`."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(
        f"get_image_features / get_text_features returned a {type(output).__name__} that is neither a tensor nor "
        "an output with a `pooler_output` tensor."
    )


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    device = getattr(model, "device", None) or (parameter.device if parameter is not None else torch.device("cpu"))
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.device(device), dtype


def text_max_length(model, tokenizer) -> int:
    """Tokens the text tower takes: the tokenizer's `model_max_length`, capped by the model's text positions."""
    limits = [getattr(tokenizer, "model_max_length", None)]
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", config)
    limits.append(getattr(text_config, "max_position_embeddings", None))
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    if not limits:
        raise ValueError("Cannot tell the model's text length: neither the tokenizer nor the config gives one.")
    return min(limits)


@torch.inference_mode()
def encode_texts(
    model, processor, texts: Sequence[str], batch_size: int = 64, device=None, progress: bool = True
) -> torch.Tensor:
    """L2-normalised text embeddings (float32, on CPU), one row per text; texts truncated to the model's length."""
    tokenizer = getattr(processor, "tokenizer", processor)
    max_length = text_max_length(model, tokenizer)
    device = torch.device(device) if device is not None else _model_device_dtype(model)[0]
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="Encoding texts", unit="batch", disable=not progress):
        tokens = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        features = model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        chunks.append(torch.nn.functional.normalize(projected_embeddings(features).float(), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@torch.inference_mode()
def encode_images(model, processor, dataset, batch_size: int = 64, device=None, progress: bool = True) -> torch.Tensor:
    """L2-normalised image embeddings (float32, on CPU) of the `image` column of `dataset`, in row order."""
    image_processor = getattr(processor, "image_processor", processor)
    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    chunks = []
    total = math.ceil(len(dataset) / batch_size)
    for images in tqdm(
        _image_batches(dataset, batch_size), total=total, desc="Encoding images", unit="batch", disable=not progress
    ):
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype))
        chunks.append(torch.nn.functional.normalize(projected_embeddings(features).float(), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def is_task_weighted_ensemble(model) -> bool:
    """Whether `model` ensembles CLIP experts with weights from the task's class names (MoDE's `MoDEModel`)."""
    return all(hasattr(model, name) for name in ("experts", "clustering_embeddings", "task_weights"))


class ExpertsAsOne:
    """Makes `encode_images` encode every expert of an ensemble in one pass over the images (decoded and
    preprocessed once): its `get_image_features` returns `(batch, num_experts, projection_dim)`, which
    `encode_images` normalises along the last dimension, i.e. per expert, and concatenates along the images."""

    def __init__(self, model):
        self.model = model

    @property
    def device(self):
        return self.model.device

    def parameters(self):
        return self.model.parameters()

    def get_image_features(self, pixel_values):
        return projected_embeddings(self.model.get_image_features(pixel_values=pixel_values)).transpose(0, 1)


# Token keys an ensemble's `clustering_embeddings` takes; the "clip" pooling has no clustering tokens of its own.
_CLUSTERING_KEYS = ("input_ids", "attention_mask", "clustering_input_ids", "clustering_attention_mask")


@torch.inference_mode()
def clustering_embeddings_of(model, tokenizer, texts, batch_size: int = 64, device=None, progress=True) -> torch.Tensor:
    """A task-weighted ensemble's clustering embeddings `(len(texts), D)` (float32, unnormalised, on the device of
    its fine centers) of `texts`, batched through `model.clustering_embeddings` with the model's tokenizer."""
    max_length = text_max_length(model.experts[0], tokenizer)
    device = torch.device(device) if device is not None else model.device
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="Clustering embeddings", unit="batch", disable=not progress):
        tokens = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        inputs = {key: tokens[key].to(device) for key in _CLUSTERING_KEYS if key in tokens}
        chunks.append(model.clustering_embeddings(**inputs).float())
    return torch.cat(chunks).to(model.fine_centers.device)


@torch.inference_mode()
def class_task_weights(model, tokenizer, class_names, templates, batch_size: int = 64, device=None, progress=True):
    """A task-weighted ensemble's expert weights `(num_experts,)` for a task: every class name under every template
    embedded with its clustering encoder, the embeddings template-averaged (`model.task_weights` on
    `(classes, templates, D)`), as the released MoDE report weighs the experts."""
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = clustering_embeddings_of(model, tokenizer, texts, batch_size, device, progress)
    return model.task_weights(embeddings.reshape(len(class_names), len(templates), -1)).float().cpu()


def ensemble_cosines(model, processor, dataset, class_names, templates, batch_size=64, device=None, progress=True):
    """A task-weighted ensemble on a zero-shot task: every expert's cosine similarities `(num_experts, images,
    classes)` (per expert exactly `zero_shot_classification`'s of that expert's CLIP) and the task weights
    `(num_experts,)` of the class names. The model must be in eval mode and on `device` (see `EvalMode`)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    classes = [
        class_embeddings(expert, processor, class_names, templates, batch_size, device, progress)
        for expert in model.experts
    ]  # num_experts x (num_classes, P)
    images = encode_images(ExpertsAsOne(model), processor, dataset, batch_size, device, progress)  # (N, E, P)
    weights = class_task_weights(model, tokenizer, class_names, templates, batch_size, device, progress)
    if len(images) == 0:
        return torch.empty(len(classes), 0, len(class_names)), weights
    # Per expert the same matmul as zero_shot_classification, so each expert's cosines are exactly its CLIP's.
    cosines = torch.stack([images[:, k] @ expert_classes.T for k, expert_classes in enumerate(classes)])
    return cosines, weights


class EvalMode:
    """Put the model in eval mode (and optionally on `device`) for the block; restore its training flag after."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __enter__(self):
        self.was_training = self.model.training
        if self.device is not None:
            self.model.to(self.device)
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


# --------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------------------------


def resolve_templates(templates, class_name_set: str | None = None) -> tuple[str, ...]:
    """`None` or `"auto"` -> `IMAGENET_TEMPLATES` when the class names are OpenAI's ImageNet names
    (`class_name_set="imagenet"`), else `DEFAULT_TEMPLATES`; a name in `TEMPLATE_SETS`; a single template string;
    or a sequence of them. Every template must hold one `{}` for the class name."""
    if templates is None or templates == AUTO_TEMPLATES:
        templates = IMAGENET_TEMPLATES if class_name_set == "imagenet" else DEFAULT_TEMPLATES
    elif isinstance(templates, str):
        templates = TEMPLATE_SETS.get(templates, (templates,))
    templates = tuple(templates)
    if not templates:
        raise ValueError("At least one prompt template is needed.")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"Prompt template {template!r} must contain '{{}}' exactly once (or name one of {list(TEMPLATE_SETS)})."
            )
    return templates


def class_names_of(dataset, class_names=None) -> list[str]:
    """Class names indexed by label id (see `dataset_class_names`)."""
    return dataset_class_names(dataset, class_names)[0]


def dataset_class_names(dataset, class_names=None, source=None) -> tuple[list[str], str | None]:
    """Class names indexed by label id, and the shipped set they come from (`"imagenet"`, ... or `None`).

    The data's class folders are the names of its `label` ClassLabel feature (image-folder sub-folders). Without
    `class_names`, they are the names, `_` read as a space, except that ImageNet synset folders (`n01440764`, ...)
    get OpenAI's ImageNet names. `class_names` may be a shipped set (`"imagenet"`, `"cifar10"`, `"cifar100"`:
    folders matched by WordNet id, label id or name), a file (one name per line in folder order, or JSON folder ->
    name), a sequence of names in label order or a mapping folder -> name; see
    `hf_moe.class_names.resolve_class_names`. `source` (the data's folder) is named in errors.

    Raises a `ValueError` for data without class labels (such as a folder with a single class sub-folder)."""
    import datasets

    if "label" not in dataset.column_names:
        raise ValueError(_no_labels_message(dataset, source))
    feature = dataset.features["label"]
    folders = feature.names if isinstance(feature, datasets.ClassLabel) else None
    return resolve_class_names(folders, class_names)


def _no_labels_message(dataset, source=None) -> str:
    """Why class-folder data has no `label` column, naming its folder and what a classification set needs."""
    folder = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else _image_folder_of(dataset)
    what = f"The data in {folder}" if folder is not None else "The data"
    found = ""
    if folder is not None and folder.is_dir():
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if len(classes) == 1:
            found = f" It has a single class sub-folder ({classes[0]!r}), and datasets' imagefolder labels none."
        elif not classes:
            found = " It has no class sub-folders (its images are not grouped by class)."
    return (
        f"{what} has no class labels (no 'label' column; columns: {dataset.column_names}).{found} A classification "
        "task needs one sub-folder per class, at least two (FOLDER/CLASS_A/*.png, FOLDER/CLASS_B/*.png): the "
        "sub-folder names are the class names."
    )


def _image_folder_of(dataset) -> Path | None:
    """The folder of a local image folder's images (where they sit in common), or None."""
    import datasets

    if "image" not in dataset.column_names or not isinstance(dataset.features["image"], datasets.Image):
        return None
    rows = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))[:64]["image"]
    paths = [row.get("path") for row in rows if isinstance(row, dict)]
    if not paths or not all(paths) or not all(os.path.isabs(path) for path in paths):
        return None
    return Path(os.path.commonpath([os.path.dirname(path) for path in paths]))


def class_embeddings(model, processor, class_names, templates, batch_size=64, device=None, progress=True):
    """Prompt ensembling (CLIP): every template through the text tower, L2-normalise, average over templates,
    normalise again. Returns (classes, dim) float32."""
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = encode_texts(model, processor, texts, batch_size=batch_size, device=device, progress=progress)
    embeddings = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(embeddings, dim=-1)


def zero_shot_classification(
    model,
    processor,
    data,
    templates: str | Sequence[str] | None = ZeroShotEvalArguments.templates,
    class_names=ZeroShotEvalArguments.class_names,
    batch_size: int = ZeroShotEvalArguments.batch_size,
    device: str | torch.device | None = ZeroShotEvalArguments.device,
    split: str | None = ZeroShotEvalArguments.split,
    return_predictions: bool = False,
    progress: bool = True,
    dataset_config: str | None = ZeroShotEvalArguments.dataset_config,
    image_column: str | None = ZeroShotEvalArguments.image_column,
    label_column: str | None = ZeroShotEvalArguments.label_column,
) -> dict[str, Any]:
    """Zero-shot top-1 and mean per-class accuracy of a CLIP-like model on labelled images.

    Args:
        model: A CLIP-like model (`get_image_features` / `get_text_features`).
        processor: Its processor (a tokenizer and an image processor, e.g. `AutoProcessor.from_pretrained`).
        data: An image folder with one sub-folder per class (datasets' `imagefolder`; class names are the
            folder names, `_` read as a space), a `datasets.Dataset` / `DatasetDict` with `image` and `label`, or
            any source `hf_moe.eval_data.load_eval_dataset` reads (a Hub id, save_to_disk folder, parquet files);
            other column names: canonicalise with `load_eval_dataset(..., image_column=, label_column=)` first.
        templates: Prompt templates with `{}` for the class name: `"auto"` (the default: OpenAI's 80
            `IMAGENET_TEMPLATES` with OpenAI's ImageNet class names, else `DEFAULT_TEMPLATES`), `"default"`,
            `"imagenet"`, a single template or a sequence of them.
        class_names: A shipped set (`"imagenet"`, `"cifar10"`, `"cifar100"`), a class-names file, names indexed
            by label id, or a mapping folder -> name (see `dataset_class_names`); required when `label` is not a
            ClassLabel. Default: the folder names (ImageNet synset folders get OpenAI's names).
        batch_size: Images or prompts per forward pass.
        device: Move the model there first; default: leave it where it is.
        split: Split to use when `data` has several (default `test`, else `validation`).
        return_predictions: Also return the predicted label id of every image (`predictions`).
        progress: Show tqdm progress bars.
        dataset_config, image_column, label_column: For `data` a Hub id or dataset repository: its configuration;
            the source columns of the images and class ids (see `hf_moe.eval_data.load_eval_dataset`).

    Returns:
        `{"top1_accuracy", "mean_per_class_accuracy", "num_images", "num_classes", "num_templates"}` (+
        `predictions`; `mean_per_class_accuracy`: the recall of each class present in the data, averaged over those
        classes, = scikit-learn's `balanced_accuracy_score`), and for a
        task-weighted ensemble (MoDE) the `task_weights` of the class names, one per expert.
    """
    check_batch_size(batch_size)
    dataset = load_eval_dataset(
        data, split, config=dataset_config, image_column=image_column, label_column=label_column, task="zero-shot"
    )
    source = data if isinstance(data, (str, os.PathLike)) else None
    names, class_name_set = dataset_class_names(dataset, class_names, source)
    templates = resolve_templates(templates, class_name_set)
    ensemble = is_task_weighted_ensemble(model)
    with EvalMode(model, device):
        if ensemble:
            cosines, task_weights = ensemble_cosines(model, processor, dataset, names, templates, batch_size, device,
                                                     progress)  # fmt: skip
            similarities = (task_weights[:, None, None] * cosines).sum(dim=0)  # the model's own ensemble
        else:
            classes = class_embeddings(model, processor, names, templates, batch_size, device, progress)
            images = encode_images(model, processor, dataset, batch_size, device, progress)
            similarities = images @ classes.T if len(images) else torch.empty(0, len(names))
    references = [int(label) for label in dataset.select_columns(["label"])[:]["label"]]
    if any(not 0 <= label < len(names) for label in references):
        raise ValueError(f"Labels must be class ids in [0, {len(names)}); the data has {sorted(set(references))}.")
    # Cosine similarity; the logit scale does not change the argmax.
    predictions = similarities.argmax(dim=-1).tolist() if len(references) else []
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    # The official metric of FGVC-Aircraft, Oxford-IIIT Pets, Caltech-101 and Flowers-102 (balanced accuracy).
    per_class = load_metric("mean_per_class_accuracy").compute(predictions=predictions, references=references)
    results = {
        "top1_accuracy": float(accuracy),
        "mean_per_class_accuracy": float(per_class["mean_per_class_accuracy"]),
        "num_images": len(references),
        "num_classes": len(names),
        "num_templates": len(templates),
    }
    if ensemble:
        results["task_weights"] = [round(float(weight), 6) for weight in task_weights]
    if return_predictions:
        results["predictions"] = predictions
    return results


# --------------------------------------------------------------------------------------------------------------
# Image-text retrieval
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RetrievalCaptions:
    """The captions retrieval scores, flattened: `captions[j]` belongs to image row `images[caption_image[j]]`,
    and `image_captions[i]` lists the caption ids of `images[i]`."""

    captions: list[str]
    image_captions: list[list[int]]
    caption_image: list[int]
    images: list[int]  # rows of the data with at least one caption, in order
    skipped_captions: int = 0  # empty captions left out (those of skipped images included)
    skipped_images: list[int] = field(default_factory=list)  # rows without any non-empty caption


def captions_of(dataset, max_captions_per_image: int | None = MAX_CAPTIONS_PER_IMAGE) -> RetrievalCaptions:
    """Flatten the `text` column (a caption or a list of captions per image) into retrieval queries.

    Empty (or whitespace-only, or null) captions are left out and counted; an image left without any caption is
    skipped and counted, as `hf_moe.data` skips rows with an empty caption. Of the remaining captions of an image,
    the first `max_captions_per_image` are kept (`None` or 0: all)."""
    if "text" not in dataset.column_names:
        raise ValueError(f"The data has no 'text' column of captions (columns: {dataset.column_names}).")
    if max_captions_per_image is not None and max_captions_per_image < 0:
        raise ValueError(f"max_captions_per_image must be >= 0 (0: all), got {max_captions_per_image}.")
    limit = max_captions_per_image or None
    result = RetrievalCaptions([], [], [], [])
    for row, text in enumerate(dataset.select_columns(["text"])[:]["text"]):
        texts = [text] if text is None or isinstance(text, str) else list(text)
        if any(caption is not None and not isinstance(caption, str) for caption in texts):
            raise ValueError(f"Image row {row} has a caption that is not a string: {text!r}.")
        kept = [caption for caption in texts if caption is not None and caption.strip()]
        result.skipped_captions += len(texts) - len(kept)
        if not kept:
            result.skipped_images.append(row)
            continue
        kept = kept[:limit]
        result.image_captions.append(list(range(len(result.captions), len(result.captions) + len(kept))))
        result.caption_image.extend([len(result.images)] * len(kept))
        result.captions.extend(kept)
        result.images.append(row)
    return result


def _image_name(dataset, row: int) -> str:
    """The image file of a row for messages, else its row number."""
    import datasets

    if isinstance(dataset.features.get("image"), datasets.Image):
        image = dataset.cast_column("image", datasets.Image(decode=False))[row]["image"]
        if isinstance(image, dict) and image.get("path"):
            return image["path"]
    return f"row {row}"


def _report_skipped_captions(dataset, captions: RetrievalCaptions) -> None:
    if not captions.skipped_captions:
        return
    from .data import MISSING_CAPTION, SkipReport

    report = SkipReport(num_rows=len(dataset))
    for row in captions.skipped_images:
        report.record(MISSING_CAPTION, lambda row=row: _image_name(dataset, row))
    logger.warning(
        f"Retrieval data: left out {captions.skipped_captions} empty captions; {report.summary()} "
        "(images without any non-empty caption)."
    )


def _top_k(queries: torch.Tensor, candidates: torch.Tensor, k: int, block: int = 1024) -> list[list[int]]:
    """Per query, the ids of its k most similar candidates, best first (blockwise: no full similarity matrix)."""
    k = min(k, candidates.shape[0])
    ranked = []
    for start in range(0, queries.shape[0], block):
        similarities = queries[start : start + block] @ candidates.T
        ranked.extend(similarities.topk(k, dim=-1).indices.tolist())
    return ranked


@dataclass
class RetrievalEmbeddings:
    """What retrieval ranks with: image->text scores are `image_queries @ text_candidates.T` `(images, captions)`,
    text->image scores `text_queries @ image_candidates.T` `(captions, images)`.

    For a CLIP-like model the queries and candidates are its normalised embeddings. For a task-weighted ensemble
    (MoDE) they are every expert's normalised embeddings side by side `(rows, experts * dim)`, one side scaled by
    the expert weights, so that each product is the ensemble's `sum_k w_k cos_k` (the model's forward up to its
    logit scale): image->text weighs with `corpus_weights`, the task weights of the whole caption corpus as one
    task's texts (the model's forward without `per_query_weights`); text->image with `query_weights`, each caption
    its own one-text task (`per_query_weights=True`)."""

    image_queries: torch.Tensor
    text_candidates: torch.Tensor
    text_queries: torch.Tensor
    image_candidates: torch.Tensor
    corpus_weights: torch.Tensor | None = None  # (num_experts,)
    query_weights: torch.Tensor | None = None  # (captions, num_experts)


def retrieval_embeddings(model, processor, dataset, captions, batch_size=64, device=None, progress=True):
    """The `RetrievalEmbeddings` of the `image` column of `dataset` and of `captions`. The model must be in eval
    mode and on `device` (see `EvalMode`)."""
    if not is_task_weighted_ensemble(model):
        images = encode_images(model, processor, dataset, batch_size, device, progress)
        texts = encode_texts(model, processor, captions, batch_size, device, progress)
        return RetrievalEmbeddings(images, texts, texts, images)
    tokenizer = getattr(processor, "tokenizer", processor)
    images = encode_images(ExpertsAsOne(model), processor, dataset, batch_size, device, progress)  # (N, E, P)
    texts = torch.stack(
        [encode_texts(expert, processor, captions, batch_size, device, progress) for expert in model.experts], dim=1
    )  # (T, E, P)
    with torch.inference_mode():
        clustering = clustering_embeddings_of(model, tokenizer, captions, batch_size, device, progress)
        corpus_weights = model.task_weights(clustering).float().cpu()
        query_weights = model.per_query_task_weights(clustering).float().cpu()
    return RetrievalEmbeddings(
        image_queries=(images * corpus_weights[None, :, None]).flatten(1),
        text_candidates=texts.flatten(1),
        text_queries=(texts * query_weights[:, :, None]).flatten(1),
        image_candidates=images.flatten(1),
        corpus_weights=corpus_weights,
        query_weights=query_weights,
    )


def image_text_retrieval(
    model,
    processor,
    data,
    batch_size: int = RetrievalEvalArguments.batch_size,
    device: str | torch.device | None = RetrievalEvalArguments.device,
    k_values: Sequence[int] = RETRIEVAL_K,
    split: str | None = RetrievalEvalArguments.split,
    progress: bool = True,
    max_captions_per_image: int | None = RetrievalEvalArguments.max_captions_per_image,
    dataset_config: str | None = RetrievalEvalArguments.dataset_config,
    image_column: str | None = RetrievalEvalArguments.image_column,
    caption_column: str | None = RetrievalEvalArguments.caption_column,
) -> dict[str, Any]:
    """Image->text and text->image retrieval recall@k of a CLIP-like model on captioned images.

    Every image is a query over all captions, and is retrieved correctly at k when ANY of its captions is among
    the k most similar; every caption is a query over all images, correct when its own image is among the k
    most similar (the COCO / Flickr30k protocol, with at most 5 captions per image).

    Empty captions are left out and images left without a caption are skipped; both are counted in the results
    (`num_skipped_captions`, `num_skipped_images`) and logged with the image files.

    A task-weighted ensemble of experts (MoDE) ranks as its forward scores (METHODS.md: the paper's retrieval):
    image->text with one set of expert weights, those of the caption corpus as one task's texts; text->image with
    each caption's own weights (`per_query_weights`); see `RetrievalEmbeddings`. Its results add `task_weights`,
    the image->text weights.

    Args:
        model, processor: As for `zero_shot_classification`.
        data: A captioned image folder (`metadata.jsonl` rows with `file_name` and `text`, a caption or a list of
            captions), or a `datasets.Dataset` / `DatasetDict` with `image` and `text`.
        batch_size: Images or captions per forward pass.
        device: Move the model there first; default: leave it where it is.
        k_values: The cut-offs k.
        split: Split to use when `data` has several (default `test`, else `validation`).
        progress: Show tqdm progress bars.
        max_captions_per_image: Score the first N non-empty captions of each image (default 5, as the COCO and
            Flickr30k protocols); `None` or 0: all.
        dataset_config, image_column, caption_column: For `data` a Hub id or dataset repository: its
            configuration; the source columns of the images and captions (see `hf_moe.eval_data.load_eval_dataset`).

    Returns:
        `{"image_to_text_R@1", ..., "text_to_image_R@1", ..., "num_images", "num_texts", "num_skipped_images",
        "num_skipped_captions"}` (+ `task_weights` for MoDE).
    """
    check_batch_size(batch_size)
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k_values must be positive integers, got {k_values}.")
    dataset = load_eval_dataset(
        data, split, config=dataset_config, image_column=image_column, caption_column=caption_column, task="retrieval"
    )
    flat = captions_of(dataset, max_captions_per_image)
    _report_skipped_captions(dataset, flat)
    if not flat.images:
        raise ValueError(f"None of the {len(dataset)} images of the data has a non-empty caption.")
    image_captions, caption_image = flat.image_captions, flat.caption_image
    scored = dataset.select(flat.images) if flat.skipped_images else dataset
    with EvalMode(model, device):
        embeddings = retrieval_embeddings(model, processor, scored, flat.captions, batch_size, device, progress)
    recall = load_metric("recall_at_k")
    results: dict[str, Any] = {}
    directions = {
        "image_to_text": (embeddings.image_queries, embeddings.text_candidates, image_captions),
        "text_to_image": (embeddings.text_queries, embeddings.image_candidates, [[image] for image in caption_image]),
    }
    for direction, (queries, candidates, relevant) in directions.items():
        ranked = _top_k(queries, candidates, k_values[-1]) if len(relevant) else []
        scores = recall.compute(predictions=ranked, references=relevant, k=k_values)
        results.update({f"{direction}_R@{k}": float(scores[f"recall@{k}"]) for k in k_values})
    results["num_images"] = len(image_captions)
    results["num_texts"] = len(flat.captions)
    results["num_skipped_images"] = len(flat.skipped_images)
    results["num_skipped_captions"] = flat.skipped_captions
    if embeddings.corpus_weights is not None:  # the image->text weights; text->image has one set per caption
        results["task_weights"] = [round(float(weight), 6) for weight in embeddings.corpus_weights]
    return results


# --------------------------------------------------------------------------------------------------------------
# Results and command line
# --------------------------------------------------------------------------------------------------------------


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write `results` as indented JSON to `path` atomically (readers never see a partial file)."""
    path = Path(path).expanduser()
    # Serialised before the temporary file exists, so unserialisable results leave nothing behind.
    text = json.dumps(results, indent=2, default=_json_default) + "\n"
    with atomic_output_file(path) as tmp:
        tmp.write_text(text)
    return path


SUITE_TASK = "suite"
EVAL_TASKS = {
    "zero-shot": (ZeroShotEvalArguments, "Zero-shot classification top-1 and mean per-class accuracy."),
    "retrieval": (RetrievalEvalArguments, "Image<->text retrieval R@1/5/10 on captioned images."),
    SUITE_TASK: (None, "Several tasks of a suite YAML in one call (hf-moe eval suite --help)."),
}


def default_output_path(model: str, task: str) -> Path:
    """`<model>/eval_<task>.json` for a local model folder, else `./eval_<task>.json`."""
    model_dir = Path(model).expanduser()
    return (model_dir if model_dir.is_dir() else Path.cwd()) / f"eval_{task}.json"


def templates_option(value: str) -> str | list[str]:
    if value in TEMPLATE_SETS or value == AUTO_TEMPLATES:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"--templates must be '{AUTO_TEMPLATES}', one of {list(TEMPLATE_SETS)} or a text file; "
            f"'{value}' is neither."
        )
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    resolve_templates(templates)  # validate before loading the model
    return templates


def evaluate_command(argv: list[str]) -> dict[str, Any] | None:
    """`hf-moe eval {zero-shot,retrieval} --model M --data DATA [...]`: evaluate, print the results JSON, write it
    to `--output`, and return it (None for `--help` / no task). `hf-moe eval suite ...` and `hf-moe eval --suite
    ...` run a suite (`hf_moe.eval_suites.suite_command`)."""
    from transformers import HfArgumentParser

    tasks = "\n".join(f"  {name:<12}{help_text}" for name, (_, help_text) in EVAL_TASKS.items())
    usage = (
        "usage: hf-moe eval TASK --model MODEL --data DATA [options]\n"
        "       hf-moe eval --suite NAME_OR_FILE.yaml --model MODEL [options]   (= hf-moe eval suite)\n\n"
        f"tasks:\n{tasks}"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return None
    if argv[0] == SUITE_TASK:
        return _suite_command(argv[1:])
    if argv[0].startswith("-") and any(arg == "--suite" or arg.startswith("--suite=") for arg in argv):
        return _suite_command(argv)  # `hf-moe eval --suite X ...`: no task word, the options in any order
    task = argv[0]
    if task not in EVAL_TASKS:
        raise ValueError(f"Unknown evaluation task '{task}'; choose one of {', '.join(EVAL_TASKS)}.")
    arguments_class, help_text = EVAL_TASKS[task]
    parser = HfArgumentParser(arguments_class, prog=f"hf-moe eval {task}", description=help_text)
    (args,) = parse_command_line(parser, argv[1:])
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}.")
    dtype_option(args.dtype)  # an unknown --dtype is refused before anything is read
    # The data and the options that depend on it are checked before the (possibly large) model is loaded.
    prepared = _check_data(task, args)
    model, processor, device = load_eval_model(args)
    metrics = _run_task(task, model, processor, prepared, args, device)
    return _record_results(task, args, prepared, metrics, device)


def _suite_command(argv: list[str]):
    from .eval_suites import suite_command

    return suite_command(argv)


@dataclass
class _PreparedData:
    """The checked data of one `hf-moe eval` call, and for zero-shot its class names and templates."""

    dataset: Any
    class_names: Any = None
    templates: Any = None


def _check_data(task: str, args) -> _PreparedData:
    """Load the data (any source `load_eval_dataset` reads, columns named by the options) and check what the task
    reads from it, with the options that depend on it; nothing is loaded but the data."""
    dataset = load_eval_dataset(
        args.data,
        args.split,
        config=args.dataset_config,
        image_column=args.image_column,
        label_column=getattr(args, "label_column", None),
        caption_column=getattr(args, "caption_column", None),
        task=task,
    )
    if task == "retrieval":
        if args.max_captions_per_image < 0:
            raise ValueError(f"--max_captions_per_image must be >= 0 (0: all), got {args.max_captions_per_image}.")
        if not args.k_values or min(args.k_values) < 1:
            raise ValueError(f"--k_values must be positive integers, got {args.k_values}.")
        captions_of(dataset, args.max_captions_per_image)
        return _PreparedData(dataset)
    class_names = args.class_names
    if args.task is not None:
        if args.class_names is not None or args.templates != AUTO_TEMPLATES:
            raise ValueError(
                f"--task takes the class names and templates from MODEL/{ZERO_SHOT_HEADS_FILE}; give --task, or "
                "--class_names / --templates, not both."
            )
        class_names, templates = read_zero_shot_heads(args.model, args.task)
        resolve_templates(templates)
    else:
        templates = templates_option(args.templates)
    dataset_class_names(dataset, class_names, args.data)
    return _PreparedData(dataset, class_names, templates)


def load_eval_model(args):
    """The model (in `--dtype`), its processor and the device of an evaluation command's options (`model`, `dtype`,
    `device`, `trust_remote_code`)."""
    from transformers import AutoProcessor

    from .loading import load_pretrained

    model = load_pretrained(args.model, trust_remote_code=args.trust_remote_code, dtype=dtype_option(args.dtype))
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    return model, processor, device_option(args.device)


def _run_task(task: str, model, processor, prepared: _PreparedData, args, device) -> dict[str, Any]:
    if task == "zero-shot":
        return zero_shot_classification(
            model,
            processor,
            prepared.dataset,
            templates=prepared.templates,
            class_names=prepared.class_names,
            batch_size=args.batch_size,
            device=device,
        )
    return image_text_retrieval(
        model,
        processor,
        prepared.dataset,
        batch_size=args.batch_size,
        device=device,
        k_values=args.k_values,
        max_captions_per_image=args.max_captions_per_image,
    )


def _record_results(task: str, args, prepared: _PreparedData, metrics: dict, device) -> dict[str, Any]:
    """Write the results JSON, record the scores in a local model folder's card, print them; return them."""
    options = {key: value for key, value in asdict(args).items() if key not in ("model", "data", "output")}
    options["device"] = device
    if task == "zero-shot" and not isinstance(prepared.templates, str):
        options["templates"] = prepared.templates
    if task == "zero-shot" and args.task is not None:
        options["class_names"] = prepared.class_names
    results = {"task": task, "model": args.model, "data": args.data, **metrics, "options": options}
    output = Path(args.output) if args.output else default_output_path(args.model, task)
    write_results(results, output)
    if Path(args.model).is_dir():  # a local model folder: its card records the scores (a Hub repo's is not ours)
        from .hub import add_eval_results

        task_type = "zero-shot-image-classification" if task == "zero-shot" else "image-text-retrieval"
        dataset = card_dataset(args.data, args.dataset_config, args.split, prepared.dataset)
        add_eval_results(args.model, metrics, task=task_type, **dataset)
    print(json.dumps(results, indent=2, default=_json_default))
    print(f"Wrote {output}", file=sys.stderr)
    return results


def card_dataset(data, config: str | None = None, split: str | None = None, dataset=None) -> dict[str, Any]:
    """The dataset keywords of `hf_moe.cards.add_eval_results` for `data`: a Hub id is recorded as itself
    (`dataset` and `dataset_id`) with its config and split (the one loaded when none was asked for); local data by
    its folder or file name, as before, with the config and split asked for."""
    from .eval_data import is_hub_id

    if isinstance(data, (str, os.PathLike)) and is_hub_id(os.fspath(data)):
        if split is None and getattr(dataset, "split", None) is not None:
            split = str(dataset.split)
        name = os.fspath(data)
        return {"dataset": name, "dataset_id": name, "dataset_config": config, "dataset_split": split}
    name = Path(data).name if isinstance(data, (str, os.PathLike)) else "data"
    return {"dataset": name, "dataset_config": config, "dataset_split": split}

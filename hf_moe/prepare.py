"""`hf-moe prepare coco|flickr30k`: the official caption annotations -> a captioned image folder.

The output is the layout `hf_moe.data.load_image_text_dataset` and `hf-moe eval retrieval` read (datasets'
imagefolder convention): the images, linked (or copied) under their own file names, and `metadata.jsonl` with one
row per image, `{"file_name", "text": [every caption, in annotation order], "image_id"}`. All captions are kept;
the retrieval protocols' 5 captions per image are taken at evaluation time (`--max_captions_per_image`).

    hf-moe prepare coco --annotations annotations/captions_val2017.json --images val2017 --output_dir coco-val2017
    hf-moe prepare flickr30k --annotations results_20130124.token --images flickr30k-images --output_dir flickr30k

- COCO: `captions_*.json` (`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`);
- Flickr30k: `results_20130124.token`, lines `1000092795.jpg#0<TAB>Two young guys ...`.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from .arguments import parse_command_line
from .fileio import atomic_output_dir


logger = logging.get_logger(__name__)

# How many missing images an error message names.
_MAX_NAMED = 5


@dataclass
class CaptionedImage:
    file_name: str
    image_id: int | str
    captions: list[str] = field(default_factory=list)


def read_coco_captions(annotations: str | Path) -> list[CaptionedImage]:
    """The images of a COCO captions file (`captions_train2017.json`, `captions_val2017.json`, ...) with their
    captions in annotation order; images without a caption are left out (and logged)."""
    path = Path(annotations).expanduser()
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"The COCO annotation file {path} is not valid JSON: {err}.") from None
    lists = ("images", "annotations")
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list) for key in lists):
        raise ValueError(f"{path} is not a COCO captions file: it needs 'images' and 'annotations' lists.")
    images: dict[int | str, CaptionedImage] = {}
    for index, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: images[{index}] has no 'id' and 'file_name': {image!r}.")
        images[image["id"]] = CaptionedImage(image["file_name"], image["id"])
    empty = 0
    for index, annotation in enumerate(content["annotations"]):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            raise ValueError(f"{path}: annotations[{index}] has no 'caption' string: {annotation!r}.")
        image = images.get(annotation.get("image_id"))
        if image is None:
            raise ValueError(
                f"{path}: annotations[{index}] refers to image_id {annotation.get('image_id')!r}, "
                "which is not among its 'images'."
            )
        caption = " ".join(annotation["caption"].split())  # COCO captions carry stray newlines and spaces
        if caption:
            image.captions.append(caption)
        else:
            empty += 1
    return _drop_uncaptioned(list(images.values()), path, empty)


def read_flickr30k_captions(annotations: str | Path) -> list[CaptionedImage]:
    """The images of Flickr30k's `results_20130124.token` (`<file>.jpg#<n>\\t<caption>` lines) with their captions
    in `#n` order."""
    path = Path(annotations).expanduser()
    images: dict[str, CaptionedImage] = {}
    numbered: dict[str, list[tuple[int, str]]] = {}
    empty = 0
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            name, tab, caption = line.rstrip("\n").partition("\t")
            file_name, hash_sign, number = name.strip().rpartition("#")
            if not tab or not hash_sign or not file_name or not number.isdigit():
                raise ValueError(
                    f"{path}:{line_number} is not a Flickr30k caption line ('<image>.jpg#<n><TAB><caption>'): "
                    f"{line.strip()[:80]!r}."
                )
            if file_name not in images:
                images[file_name] = CaptionedImage(file_name, Path(file_name).stem)
                numbered[file_name] = []
            caption = " ".join(caption.split())
            if caption:
                numbered[file_name].append((int(number), caption))
            else:
                empty += 1
    for file_name, image in images.items():
        image.captions = [caption for _, caption in sorted(numbered[file_name], key=lambda item: item[0])]
    return _drop_uncaptioned(list(images.values()), path, empty)


def _drop_uncaptioned(images: list[CaptionedImage], path: Path, empty: int) -> list[CaptionedImage]:
    if empty:
        logger.warning(f"{path}: left out {empty} empty captions.")
    kept = [image for image in images if image.captions]
    if len(kept) < len(images):
        uncaptioned = [image.file_name for image in images if not image.captions]
        logger.warning(
            f"{path}: left out {len(uncaptioned)} images without a caption (e.g. {', '.join(uncaptioned[:3])})."
        )
    if not kept:
        raise ValueError(f"{path} holds no captioned image.")
    return kept


READERS: dict[str, Callable[[str | Path], list[CaptionedImage]]] = {
    "coco": read_coco_captions,
    "flickr30k": read_flickr30k_captions,
}


@dataclass
class PrepareArguments:
    """The options of `hf-moe prepare` and the keyword defaults of `prepare_captioned_folder` (declared once, here)."""

    annotations: str = field(
        metadata={"help": "The caption file: COCO captions_val2017.json, or Flickr30k results_20130124.token."}
    )
    images: str = field(metadata={"help": "The image folder the annotations refer to (val2017/, flickr30k-images/)."})
    output_dir: str = field(metadata={"help": "The captioned image folder to write."})
    skip_missing: bool = field(
        default=False, metadata={"help": "Leave out annotated images missing from --images instead of refusing."}
    )
    copy_images: bool = field(
        default=False,
        metadata={"help": "Copy the images (default: symlink them, or hard-link them where symlinks fail)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})


def prepare_captioned_folder(
    dataset: str,
    annotations: str | Path,
    images: str | Path,
    output_dir: str | Path,
    *,
    skip_missing: bool = PrepareArguments.skip_missing,
    copy_images: bool = PrepareArguments.copy_images,
    overwrite: bool = PrepareArguments.overwrite,
) -> Path:
    """Write the captioned image folder of `dataset` (`"coco"` or `"flickr30k"`) to `output_dir`, atomically.

    Args:
        dataset: `"coco"` or `"flickr30k"`.
        annotations: The official caption file (COCO `captions_val2017.json`, Flickr30k `results_20130124.token`).
        images: The folder holding the images the annotations name (COCO `val2017/`, `flickr30k-images/`).
        output_dir: The folder to write (refused when not empty, unless `overwrite`).
        skip_missing: Leave out annotated images missing from `images` (logged) instead of refusing.
        copy_images: Copy the images; by default they are symlinked (hard-linked where symlinks are not
            allowed), so the output takes no space for them but needs `images` to stay where it is.
        overwrite: Replace a non-empty `output_dir`.

    Returns:
        `Path`: the output folder.

    Raises:
        ValueError / FileNotFoundError naming the file, line or images at fault, before anything is written.
    """
    if dataset not in READERS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(READERS)}.")
    annotations, images = Path(annotations).expanduser(), Path(images).expanduser()
    if not annotations.is_file():
        raise FileNotFoundError(f"Annotation file '{annotations}' does not exist.")
    if not images.is_dir():
        raise FileNotFoundError(f"Image folder '{images}' does not exist.")
    records = READERS[dataset](annotations)
    unsafe = [r.file_name for r in records if Path(r.file_name).is_absolute() or ".." in Path(r.file_name).parts]
    if unsafe:
        raise ValueError(f"{annotations} names images outside the image folder: {', '.join(unsafe[:_MAX_NAMED])}.")
    missing = [record for record in records if not (images / record.file_name).is_file()]
    if missing:
        names = ", ".join(record.file_name for record in missing[:_MAX_NAMED])
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        if not skip_missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(records)} images of {annotations.name} are not in {images}: "
                f"{names}{more}. Pass --skip_missing to leave them out."
            )
        logger.warning(f"Leaving out {len(missing)} images missing from {images}: {names}{more}.")
        missing_names = {record.file_name for record in missing}
        records = [record for record in records if record.file_name not in missing_names]
        if not records:
            raise FileNotFoundError(f"None of the images of {annotations.name} is in {images}.")
    place = shutil.copy2 if copy_images else _link
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[annotations, images]) as tmp:
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for record in logging.tqdm(records, desc="Writing images and captions", unit="image"):
                target = tmp / record.file_name
                target.parent.mkdir(parents=True, exist_ok=True)
                place((images / record.file_name).resolve(), target)
                row = {"file_name": record.file_name, "text": record.captions, "image_id": record.image_id}
                metadata.write(json.dumps(row, ensure_ascii=False) + "\n")
    num_captions = sum(len(record.captions) for record in records)
    logger.info(f"Wrote {len(records)} images with {num_captions} captions to {output_dir}.")
    return Path(output_dir)


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target)
    except OSError:
        try:
            os.link(source, target)
        except OSError as err:
            raise OSError(
                f"Could not link {source} into the output folder ({err}); pass --copy_images to copy the images."
            ) from err


def main(argv: list[str] | None = None) -> Path | None:
    """`hf-moe prepare coco|flickr30k --annotations FILE --images DIR --output_dir DIR [...]`."""
    import sys

    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    usage = (
        "usage: hf-moe prepare {coco,flickr30k} --annotations FILE --images DIR --output_dir DIR "
        "[--skip_missing] [--copy_images] [--overwrite]\n\n" + "\n\n".join(__doc__.split("\n\n")[1:])
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return None
    dataset = argv[0]
    if dataset not in READERS:
        raise ValueError(f"Unknown dataset '{dataset}'; choose one of {', '.join(READERS)}.")
    parser = HfArgumentParser(PrepareArguments, prog=f"hf-moe prepare {dataset}")
    (args,) = parse_command_line(parser, argv[1:])
    return prepare_captioned_folder(
        dataset,
        args.annotations,
        args.images,
        args.output_dir,
        skip_missing=args.skip_missing,
        copy_images=args.copy_images,
        overwrite=args.overwrite,
    )

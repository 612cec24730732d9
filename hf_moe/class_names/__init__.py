"""Class names for zero-shot classification, and the mapping from a class-folder data set's folders to them.

Shipped sets (JSON files next to this module, read on first use):

- `imagenet`: the 1000 names of OpenAI's CLIP notebook "Prompt_Engineering_for_ImageNet.ipynb" (also open_clip's
  `IMAGENET_CLASSNAMES`, which later renamed the two "sunglasses" classes 836/837; the notebook's are kept here, as
  CLIP's published ImageNet numbers use them), with the 1000 WordNet ids of ILSVRC-2012 in class-index order
  (sorted, `n01440764` = tench ... `n15075141` = toilet paper), so a synset-named ImageNet folder maps to them;
- `cifar10`, `cifar100`: the names of OpenAI's CLIP `data/prompts.md`, in the data sets' label order.
"""

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path


CLASS_NAME_SETS: tuple[str, ...] = ("imagenet", "cifar10", "cifar100")
_DIR = Path(__file__).resolve().parent
_WNID = re.compile(r"n\d{8}")


@functools.cache
def load_class_names(name: str) -> tuple[str, ...]:
    """The shipped class names `name` (one of `CLASS_NAME_SETS`), indexed by the data set's label id."""
    if name not in CLASS_NAME_SETS:
        raise ValueError(f"Unknown class-name set {name!r}; shipped sets: {', '.join(CLASS_NAME_SETS)}.")
    return tuple(json.loads((_DIR / f"{name}_names.json").read_text(encoding="utf-8")))


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids in class-index order (`imagenet_wnids()[i]` is class i)."""
    return tuple(json.loads((_DIR / "imagenet_wnids.json").read_text(encoding="utf-8")))


@functools.cache
def _wnid_index() -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


def is_imagenet_synset_folders(folders: Sequence[str]) -> bool:
    """Whether every folder is named by an ILSVRC-2012 WordNet id (`n01440764`, ...)."""
    return bool(folders) and all(folder in _wnid_index() for folder in folders)


def resolve_class_names(
    folders: Sequence[str] | None, class_names: str | Path | Sequence[str] | Mapping[str, str] | None = None
) -> tuple[list[str], str | None]:
    """Class names in label order for a data set whose label ids are `folders` (its class sub-folders in label
    order; `None` when the labels are plain ids), and the shipped set they come from (`None` if none).

    Args:
        folders: The data set's class folder names, in label-id order (datasets' imagefolder sorts them).
        class_names:
            - `None`: the folder names with `_` read as a space, except that synset folders (`n01440764`, ...)
              get OpenAI's ImageNet names;
            - a shipped set name (`"imagenet"`, `"cifar10"`, `"cifar100"`): each folder is looked up by its
              WordNet id (ImageNet), its label id (a folder named `0`, `1`, ...) or its name (`aquarium_fish`);
              with plain label ids, the set indexed by them;
            - a text file with one name per line, in folder order, or a JSON file holding such a list or an
              object mapping folder -> name;
            - a sequence of names in label order, or a mapping folder -> name.

    Raises:
        `ValueError` naming the file, the folders or the counts that do not fit.
    """
    folders = list(folders) if folders is not None else None
    if class_names is None:
        if folders is None:
            raise ValueError("The labels are plain ids without class names; pass class names (--class_names).")
        if is_imagenet_synset_folders(folders):
            return _from_shipped_set("imagenet", folders), "imagenet"
        return [folder.replace("_", " ") for folder in folders], None
    if isinstance(class_names, str) and class_names in CLASS_NAME_SETS:
        return _from_shipped_set(class_names, folders), class_names
    if isinstance(class_names, (str, Path)):
        return _from_mapping_or_list(_read_class_names_file(class_names), folders, f"the file {class_names}"), None
    return _from_mapping_or_list(class_names, folders, "the class names given"), None


def _from_shipped_set(name: str, folders: list[str] | None) -> list[str]:
    names = load_class_names(name)
    if folders is None:
        return list(names)
    by_name = {_normalize(class_name): class_name for class_name in names}
    resolved, unknown = [], []
    for folder in folders:
        if name == "imagenet" and _WNID.fullmatch(folder):
            index = _wnid_index().get(folder)
            resolved.append(names[index] if index is not None else None)
        elif folder.isdigit():
            resolved.append(names[int(folder)] if int(folder) < len(names) else None)
        else:
            resolved.append(by_name.get(_normalize(folder)))
        if resolved[-1] is None:
            unknown.append(folder)
    if unknown:
        raise ValueError(
            f"{len(unknown)} class folders are neither a {name} WordNet id, label id nor class name: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Pass --class_names FILE with one name per "
            "line in folder order, or a JSON object mapping folder -> name."
        )
    return resolved


def _normalize(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def _read_class_names_file(path: str | Path) -> list[str] | dict[str, str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--class_names '{path}' is neither a shipped set ({', '.join(CLASS_NAME_SETS)}) nor an existing file."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"The class-names file {path} is not valid JSON: {err}.") from None
    if isinstance(content, dict) and all(isinstance(v, str) for v in content.values()):
        return content
    if isinstance(content, list) and all(isinstance(v, str) for v in content):
        return content
    raise ValueError(f"The class-names file {path} must hold a list of names or an object mapping folder -> name.")


def _from_mapping_or_list(
    class_names: Sequence[str] | Mapping[str, str], folders: list[str] | None, source: str
) -> list[str]:
    if isinstance(class_names, Mapping):
        if folders is None:
            raise ValueError(f"{source} map folders to names, but the labels are plain ids without folder names.")
        missing = [folder for folder in folders if folder not in class_names]
        if missing:
            raise ValueError(
                f"{source} name no class for the folders {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}."
            )
        names = [str(class_names[folder]) for folder in folders]
    else:
        names = [str(name) for name in class_names]
        if folders is not None and len(names) != len(folders):
            raise ValueError(f"{source} hold {len(names)} class names for {len(folders)} classes in the data.")
    empty = [folder_or_index for folder_or_index, name in zip(folders or range(len(names)), names) if not name.strip()]
    if empty:
        raise ValueError(f"{source} give an empty class name for {empty[:5]}.")
    return names

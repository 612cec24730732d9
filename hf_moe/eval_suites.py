"""Evaluation suites: several zero-shot classification and retrieval tasks in one call, from a YAML file.

    hf-moe eval suite --model MODEL --suite ta8|clip_moe|FILE.yaml [--tasks a b] [--output_dir DIR]
        [--batch_size 64] [--device cuda] [--dtype bfloat16] [--trust_remote_code]

A suite file names its tasks; each task gives its data (a datasets Hub id, or a `save_to_disk` folder, parquet
file(s) or image folder, relative to the YAML file), split, columns, class names, prompt templates and headline
metric, and where each of them comes from (`source`). Shipped suites live in `hf_moe/suites/` and are found by name:

- `ta8`: WEMoE's eight tasks on fusion_bench's Hub datasets, with CLIP's per-dataset class names and templates;
- `clip_moe`: the CLIP-MoE paper's zero-shot (ImageNet, CIFAR-10/100) and retrieval (COCO 5k, Flickr30k) sets, as
  the CLIP-MoE repository's evaluation scripts run them.

Schema (unknown keys are refused; every error names the file, the task and the key):

```yaml
name: my_suite
description: ...            # optional
source: ...                 # optional: where the suite comes from
tasks:
  - name: cifar10            # unique; --tasks picks by it
    task: zero-shot          # or retrieval
    data: uoft-cs/cifar10    # Hub id, or a path relative to this file
    config: null             # optional datasets config
    split: test              # optional (default: test, else validation, else the only split)
    image_column: img        # optional source column names (default image / label / text)
    label_column: label
    caption_column: caption  # retrieval
    filters: {split: test}   # optional: rows whose columns have these values
    class_names: feature     # `feature` (the ClassLabel's names, as stored; the default), a shipped set
                             # (imagenet, cifar10, cifar100: indexed by label id) or a list in label order
    templates: imagenet      # a list of templates with one `{}` each, or a named set: imagenet (OpenAI's 80),
                             # default (8); the default is `default`
    metric: top1             # zero-shot: top1 | mean_per_class; retrieval: recall (R@1/5/10 both directions)
    max_captions_per_image: 5  # retrieval (default 5, as the COCO / Flickr30k protocols; 0: all)
    source: "..."            # where the data, class names and templates come from
```

The command checks every selected task's data, columns and class names (the count must equal the data's
`ClassLabel` classes) before it loads the model, then evaluates each task with `hf_moe.evaluation`'s functions (so a
suite task scores exactly as `hf-moe eval zero-shot` / `retrieval` on the same data; dense CLIP, CLIP-MoE, WEMoE and
MoDE alike), prints one table (task, metric, score, images), writes JSON and CSV (`eval_suite_<name>.json` / `.csv`
in `--output_dir`, default the model's local folder, else the current folder) and records every task's scores in a
local model folder's card (model-index, with the dataset's Hub id, config and split).
"""

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

SUITES_DIR = Path(__file__).resolve().parent / "suites"
TASK_TYPES = ("zero-shot", "retrieval")
# Headline metric name in a suite file -> the key of zero_shot_classification's results.
ZERO_SHOT_METRICS = {"top1": "top1_accuracy", "mean_per_class": "mean_per_class_accuracy"}
RETRIEVAL_METRICS = ("recall",)
RETRIEVAL_K = (1, 5, 10)
FEATURE_CLASS_NAMES = "feature"
SUITE_KEYS = ("name", "description", "source", "tasks")
TASK_KEYS = (
    "name",
    "task",
    "data",
    "config",
    "split",
    "image_column",
    "label_column",
    "caption_column",
    "filters",
    "class_names",
    "templates",
    "metric",
    "max_captions_per_image",
    "source",
)
# Keys that only one kind of task reads: given to the other kind they are a mistake, not a no-op.
ZERO_SHOT_ONLY = ("label_column", "class_names", "templates")
RETRIEVAL_ONLY = ("caption_column", "max_captions_per_image")
# A `data` value ending so is a local file even when it does not exist yet (the error then names the path).
LOCAL_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv")


class SuiteError(ValueError):
    """A suite file or a suite task that cannot be used; the message names the file, the task and the key."""


@dataclass
class SuiteTask:
    name: str
    task: str
    data: str  # a Hub id, or an absolute path (resolved against the suite file's folder)
    local: bool  # whether `data` is a local path
    metric: str
    config: str | None = None
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    filters: dict | None = None
    class_names: str | list[str] | None = None
    templates: str | list[str] | None = None
    max_captions_per_image: int = 5
    source: str | None = None


@dataclass
class Suite:
    name: str
    path: Path
    tasks: list[SuiteTask]
    description: str | None = None
    source: str | None = None

    def select(self, names: Sequence[str] | None) -> list[SuiteTask]:
        """The tasks named in `names` (in the suite's order), or all of them."""
        if not names:
            return list(self.tasks)
        known = [task.name for task in self.tasks]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SuiteError(
                f"{self.path}: --tasks {', '.join(unknown)}: no such task; the suite has {', '.join(known)}."
            )
        return [task for task in self.tasks if task.name in set(names)]


def available_suites() -> list[str]:
    """The names of the shipped suites (`hf_moe/suites/<name>.yaml`)."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file of a shipped suite name (`ta8`) or of a path; an error naming both kinds otherwise."""
    text = os.fspath(name_or_path)
    if text in available_suites():
        return SUITES_DIR / f"{text}.yaml"
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    raise SuiteError(
        f"--suite '{text}' is neither a shipped suite ({', '.join(available_suites())}) nor an existing YAML file."
    )


def read_suite(name_or_path: str | os.PathLike) -> Suite:
    """Read and validate a suite: a shipped name (`ta8`, `clip_moe`) or a YAML file.

    Checks everything the file alone can tell (keys, types, task kinds, metrics, templates with exactly one `{}`,
    shipped set names, unique task names); the data and class-name counts are checked by `check_tasks`. Raises
    `SuiteError` (a `ValueError`) naming the file, the task and the key."""
    import yaml

    path = suite_path(name_or_path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(content, dict):
        raise SuiteError(f"{path}: a suite file is a mapping with keys {', '.join(SUITE_KEYS)}.")
    unknown = [key for key in content if key not in SUITE_KEYS]
    if unknown:
        raise SuiteError(f"{path}: unknown key '{unknown[0]}'; a suite has {', '.join(SUITE_KEYS)}.")
    tasks = content.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise SuiteError(f"{path}: key 'tasks' must be a non-empty list of tasks.")
    parsed, seen = [], set()
    for index, entry in enumerate(tasks):
        task = _read_task(path, index, entry)
        if task.name in seen:
            raise SuiteError(f"{path}: task '{task.name}': key 'name': another task has the same name.")
        seen.add(task.name)
        parsed.append(task)
    name = content.get("name", path.stem)
    for key in ("name", "description", "source"):
        if key in content and not isinstance(content[key], str):
            raise SuiteError(f"{path}: key '{key}' must be a string.")
    return Suite(name=name, path=path, tasks=parsed, description=content.get("description"),
                 source=content.get("source"))  # fmt: skip


def _read_task(path: Path, index: int, entry) -> SuiteTask:
    from .class_names import CLASS_NAME_SETS
    from .evaluation import TEMPLATE_SETS

    where = f"{path}: task {index + 1}"
    if not isinstance(entry, dict):
        raise SuiteError(f"{where}: a task is a mapping with keys {', '.join(TASK_KEYS)}.")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SuiteError(f"{where}: key 'name': missing (every task needs a name).")
    where = f"{path}: task '{name}'"

    def fail(key, message):
        raise SuiteError(f"{where}: key '{key}': {message}")

    unknown = [key for key in entry if key not in TASK_KEYS]
    if unknown:
        fail(unknown[0], f"unknown key; a task has {', '.join(TASK_KEYS)}.")
    kind = entry.get("task", "zero-shot")
    if kind not in TASK_TYPES:
        fail("task", f"'{kind}' is not one of {', '.join(TASK_TYPES)}.")
    if "data" not in entry or entry["data"] in (None, ""):
        fail("data", "missing (a Hub dataset id, or a path relative to the suite file).")
    if not isinstance(entry["data"], str):
        fail("data", f"must be a string, not {type(entry['data']).__name__}.")
    for key in ("config", "split", "image_column", "label_column", "caption_column", "source"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            fail(key, f"must be a string, not {type(entry[key]).__name__}.")
    foreign = RETRIEVAL_ONLY if kind == "zero-shot" else ZERO_SHOT_ONLY
    for key in foreign:
        if key in entry:
            fail(key, f"a {kind} task does not use it.")
    filters = entry.get("filters")
    if filters is not None and (not isinstance(filters, dict) or not filters):
        fail("filters", "must be a mapping {column: value} of the rows to keep.")

    metric = entry.get("metric", "top1" if kind == "zero-shot" else "recall")
    allowed = tuple(ZERO_SHOT_METRICS) if kind == "zero-shot" else RETRIEVAL_METRICS
    if metric not in allowed:
        fail("metric", f"'{metric}' is not a {kind} metric; choose one of {', '.join(allowed)}.")

    class_names = templates = None
    max_captions = entry.get("max_captions_per_image", 5)
    if kind == "zero-shot":
        class_names = entry.get("class_names", FEATURE_CLASS_NAMES)
        if isinstance(class_names, str):
            if class_names != FEATURE_CLASS_NAMES and class_names not in CLASS_NAME_SETS:
                fail("class_names", f"'{class_names}' is neither '{FEATURE_CLASS_NAMES}', a shipped set "
                                    f"({', '.join(CLASS_NAME_SETS)}) nor a list of names.")  # fmt: skip
        elif isinstance(class_names, list) and class_names:
            bad = [value for value in class_names if not isinstance(value, str) or not value.strip()]
            if bad:
                fail("class_names", f"every class name must be a non-empty string; found {bad[0]!r}.")
        else:
            fail("class_names", f"'{FEATURE_CLASS_NAMES}', a shipped set name or a non-empty list of names.")
        templates = entry.get("templates", "default")
        if isinstance(templates, str):
            if templates not in TEMPLATE_SETS:
                fail("templates", f"'{templates}' is not a named set ({', '.join(TEMPLATE_SETS)}); a single template "
                                  "is a one-item list.")  # fmt: skip
        elif isinstance(templates, list) and templates:
            for template in templates:
                if not isinstance(template, str) or template.count("{}") != 1:
                    fail("templates", f"template {template!r} must contain '{{}}' exactly once.")
        else:
            fail("templates", "a named set or a non-empty list of templates.")
    elif not isinstance(max_captions, int) or isinstance(max_captions, bool) or max_captions < 0:
        fail("max_captions_per_image", f"must be an integer >= 0 (0: all), got {max_captions!r}.")

    data = entry["data"]
    given = Path(data).expanduser()
    local_path = given if given.is_absolute() else (path.parent / given).resolve()
    # A path relative to the suite file when it exists there or is spelled as a path; otherwise a Hub id.
    local = local_path.exists() or data.startswith((".", "/", "~")) or given.suffix.lower() in LOCAL_SUFFIXES
    return SuiteTask(
        name=name,
        task=kind,
        data=str(local_path) if local else data,
        local=local,
        metric=metric,
        config=entry.get("config"),
        split=entry.get("split"),
        image_column=entry.get("image_column"),
        label_column=entry.get("label_column"),
        caption_column=entry.get("caption_column"),
        filters=dict(filters) if filters else None,
        class_names=class_names,
        templates=templates,
        max_captions_per_image=max_captions,
        source=entry.get("source"),
    )


# --------------------------------------------------------------------------------------------------------------
# Data checks (before the model loads) and running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedTask:
    """A suite task with its loaded data and resolved class names / templates."""

    task: SuiteTask
    dataset: Any
    class_names: list[str] | None = None
    templates: tuple[str, ...] | None = None


def load_task_data(task: SuiteTask, suite_file: Path | None = None):
    """The task's data as `hf_moe.evaluation.load_eval_dataset` loads it (canonical `image` / `label` / `text`)."""
    from .evaluation import load_eval_dataset

    try:
        return load_eval_dataset(
            task.data,
            task.split,
            config=task.config,
            image_column=task.image_column,
            label_column=task.label_column,
            caption_column=task.caption_column,
            filters=task.filters,
        )
    except (ValueError, OSError) as err:
        where = f"{suite_file}: " if suite_file else ""
        raise SuiteError(f"{where}task '{task.name}': key 'data' ({task.data}): {err}") from err


def resolve_task_class_names(task: SuiteTask, dataset, suite_file: Path | None = None) -> list[str]:
    """The task's class names in label-id order, checked against the data: their count must equal the `ClassLabel`'s
    number of classes (or exceed every label id when the labels are plain integers), and a list holding exactly the
    ClassLabel's own names in another order is refused (a label-order mistake, e.g. CLIP's EuroSAT order)."""
    import datasets

    from .class_names import load_class_names

    where = f"{suite_file}: task '{task.name}'" if suite_file else f"task '{task.name}'"
    if "label" not in dataset.column_names:
        raise SuiteError(
            f"{where}: key 'label_column': the data has no label column (columns: {dataset.column_names})."
        )
    feature = dataset.features["label"]
    feature_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if task.class_names == FEATURE_CLASS_NAMES:
        if feature_names is None:
            raise SuiteError(f"{where}: key 'class_names': the label column is not a ClassLabel, so the data names no "
                             "classes; give the names as a list in label order or a shipped set.")  # fmt: skip
        return feature_names
    names = list(load_class_names(task.class_names)) if isinstance(task.class_names, str) else list(task.class_names)
    if feature_names is not None:
        if len(names) != len(feature_names):
            raise SuiteError(f"{where}: key 'class_names': {len(names)} class names, but the data's ClassLabel "
                             f"'{task.label_column or 'label'}' has {len(feature_names)} classes.")  # fmt: skip
        normalized = [_normalize(name) for name in names]
        stored = [_normalize(name) for name in feature_names]
        if normalized != stored and sorted(normalized) == sorted(stored):
            first = next(i for i, (a, b) in enumerate(zip(normalized, stored)) if a != b)
            raise SuiteError(f"{where}: key 'class_names': the same names as the data's ClassLabel in another order "
                             f"(label {first} is {feature_names[first]!r}, the list says {names[first]!r}); list them "
                             "in label order.")  # fmt: skip
    else:
        labels = dataset.select_columns(["label"])[:]["label"]
        top = max((int(label) for label in labels), default=-1)
        if top >= len(names):
            raise SuiteError(f"{where}: key 'class_names': {len(names)} class names, but the data has label id {top}.")
    return names


def _normalize(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def prepare_tasks(tasks: Sequence[SuiteTask], suite_file: Path | None = None) -> list[PreparedTask]:
    """Load every task's data and resolve its class names and templates: everything that can fail before a model is
    loaded fails here, naming the suite file, the task and the key."""
    from .evaluation import captions_of, resolve_templates

    prepared = []
    for task in tasks:
        dataset = load_task_data(task, suite_file)
        if task.task == "zero-shot":
            names = resolve_task_class_names(task, dataset, suite_file)
            templates = resolve_templates(task.templates)
            prepared.append(PreparedTask(task, dataset, names, templates))
        else:
            try:
                captions_of(dataset, task.max_captions_per_image)
            except ValueError as err:
                raise SuiteError(f"{suite_file}: task '{task.name}': key 'caption_column': {err}") from err
            prepared.append(PreparedTask(task, dataset))
    return prepared


def evaluate_task(model, processor, prepared: PreparedTask, batch_size: int = 64, device=None, progress=True) -> dict:
    """The task's metrics from `zero_shot_classification` / `image_text_retrieval`, as `hf-moe eval` gets them."""
    from .evaluation import image_text_retrieval, zero_shot_classification

    task = prepared.task
    if task.task == "zero-shot":
        return zero_shot_classification(
            model,
            processor,
            prepared.dataset,
            templates=list(prepared.templates),
            class_names=list(prepared.class_names),
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    return image_text_retrieval(
        model,
        processor,
        prepared.dataset,
        batch_size=batch_size,
        device=device,
        k_values=RETRIEVAL_K,
        progress=progress,
        max_captions_per_image=task.max_captions_per_image,
    )


def table_rows(task: SuiteTask, metrics: dict) -> list[dict]:
    """The table rows of one task: its headline metric (zero-shot), or R@1/5/10 of both directions (retrieval)."""
    if task.task == "zero-shot":
        key = ZERO_SHOT_METRICS[task.metric]
        if key not in metrics:
            raise KeyError(f"task '{task.name}': the evaluation returned no '{key}' (keys: {sorted(metrics)}).")
        pairs = [(task.metric, metrics[key])]
    else:
        pairs = [(f"{direction}_R@{k}", metrics[f"{direction}_R@{k}"])
                 for direction in ("image_to_text", "text_to_image") for k in RETRIEVAL_K]  # fmt: skip
    return [{"task": task.name, "metric": metric, "score": float(score), "num_images": int(metrics["num_images"])}
            for metric, score in pairs]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """A plain-text table: task, metric, score (as computed, a fraction), images."""
    header = ("task", "metric", "score", "images")
    cells = [header] + [(row["task"], row["metric"], f"{row['score']:.4f}", str(row["num_images"])) for row in rows]
    widths = [max(len(cell[i]) for cell in cells) for i in range(len(header))]
    lines = ["  ".join(cell[i].ljust(widths[i]) if i < 2 else cell[i].rjust(widths[i]) for i in range(len(header)))
             for cell in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_suite_outputs(results: dict, output_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `eval_suite_<name>.json` (everything) and `.csv` (the table rows) to `output_dir`, each atomically."""
    from .evaluation import _json_default
    from .fileio import atomic_output_file

    output_dir = Path(output_dir).expanduser()
    json_path, csv_path = output_dir / f"eval_suite_{name}.json", output_dir / f"eval_suite_{name}.csv"
    text = json.dumps(results, indent=2, default=_json_default) + "\n"  # serialised before any file is touched
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["task", "metric", "score", "num_images"], lineterminator="\n")
    writer.writeheader()
    for row in results["table"]:
        writer.writerow(
            {key: (repr(row[key]) if isinstance(row[key], float) else row[key]) for key in writer.fieldnames}
        )
    with atomic_output_file(json_path) as tmp:
        tmp.write_text(text)
    with atomic_output_file(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())
    return json_path, csv_path


def record_in_card(model_dir: str | os.PathLike, task: SuiteTask, metrics: dict) -> None:
    """Record the task's scores in the local model folder's card (model-index), with the Hub id / config / split."""
    from .cards import add_eval_results

    task_type = "zero-shot-image-classification" if task.task == "zero-shot" else "image-text-retrieval"
    add_eval_results(
        model_dir,
        metrics,
        task=task_type,
        dataset=task.name,
        dataset_id=None if task.local else task.data,
        dataset_config=task.config,
        dataset_split=task.split,
    )


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SuiteEvalArguments:
    model: str = field(metadata={"help": "CLIP-like model: a local folder or Hub id."})
    suite: str = field(
        metadata={"help": "A shipped suite (ta8, clip_moe) or a suite YAML file (paths in it are relative to it)."}
    )
    tasks: list[str] | None = field(default=None, metadata={"help": "Evaluate only these tasks of the suite."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for eval_suite_<name>.json and .csv (default: MODEL for a local MODEL folder, else the "
            "current folder)."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Images or texts per forward pass."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype, e.g. bfloat16 (default: as saved)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the model code shipped in the model folder or repo. hf-moe's own models do not need it "
            "where hf-moe is installed; only pass it for code you trust."
        },
    )


def run_suite(args: SuiteEvalArguments) -> dict[str, Any]:
    """Read the suite, check every selected task's data before loading the model, evaluate, and return the results
    (`{"suite", "suite_file", "model", "tasks": [...], "table": [...], "options"}`); writes nothing."""
    return _run_suite(args)[0]


def _run_suite(args: SuiteEvalArguments, progress: bool = True) -> tuple[dict[str, Any], list[SuiteTask]]:
    from .evaluation import load_eval_model
    from .loading import dtype_option

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}.")
    dtype_option(args.dtype)  # an unknown --dtype is refused before any data is read
    suite = read_suite(args.suite)
    prepared = prepare_tasks(suite.select(args.tasks), suite.path)

    model, processor, device = load_eval_model(args)
    tasks, rows = [], []
    for item in prepared:
        task = item.task
        if progress:
            print(f"[{task.name}] {task.task} on {task.data} ({len(item.dataset)} rows)", file=sys.stderr)
        metrics = evaluate_task(model, processor, item, args.batch_size, device, progress)
        task_rows = table_rows(task, metrics)
        rows.extend(task_rows)
        entry = {key: value for key, value in asdict(task).items() if key not in ("class_names", "templates", "local")}
        entry["data_is_local"] = task.local
        if task.task == "zero-shot":
            entry["num_classes"], entry["num_templates"] = len(item.class_names), len(item.templates)
        entry["score"] = task_rows[0]["score"]
        entry["metrics"] = metrics
        tasks.append(entry)
    options = {"batch_size": args.batch_size, "device": device, "dtype": args.dtype,
               "trust_remote_code": args.trust_remote_code, "tasks": args.tasks}  # fmt: skip
    return {
        "suite": suite.name,
        "suite_file": str(suite.path),
        "model": args.model,
        "description": suite.description,
        "source": suite.source,
        "tasks": tasks,
        "table": rows,
        "options": options,
    }, [item.task for item in prepared]


def suite_command(argv: list[str]) -> dict[str, Any] | None:
    """`hf-moe eval suite --model M --suite ta8|FILE.yaml [...]`: evaluate every task, print one table, write JSON and
    CSV, record the scores in a local model folder's card; returns the results."""
    from transformers import HfArgumentParser

    from .arguments import parse_command_line

    parser = HfArgumentParser(
        SuiteEvalArguments,
        prog="hf-moe eval suite",
        description="Evaluate a suite of zero-shot and retrieval tasks. "
        f"Shipped suites: {', '.join(available_suites())}.",
    )
    (args,) = parse_command_line(parser, argv)
    results, tasks = _run_suite(args)
    model_dir = Path(args.model).expanduser()
    output_dir = Path(args.output_dir) if args.output_dir else (model_dir if model_dir.is_dir() else Path.cwd())
    json_path, csv_path = write_suite_outputs(results, output_dir, results["suite"])
    if model_dir.is_dir():  # a local model folder: its card records the scores (a Hub repo's is not ours)
        for task, entry in zip(tasks, results["tasks"]):
            record_in_card(model_dir, task, entry["metrics"])
    print(format_table(results["table"]))
    print(f"Wrote {json_path} and {csv_path}", file=sys.stderr)
    return results


__all__ = [
    "Suite",
    "SuiteError",
    "SuiteEvalArguments",
    "SuiteTask",
    "available_suites",
    "format_table",
    "prepare_tasks",
    "read_suite",
    "resolve_task_class_names",
    "run_suite",
    "suite_command",
    "write_suite_outputs",
]

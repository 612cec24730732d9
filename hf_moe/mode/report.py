"""`hf-moe mode report`: the zero-shot report of a MoDE model, as the released code writes it (MetaCLIP
mode/post_report_ensemble.py, METHODS.md section 2): per task, every expert's accuracy, the best of them
(`expert-max`, an oracle), the uniform mean of the experts' cosine logits (`all_unit`) and MoDE's task-adaptive
ensemble (`ensemble`), then a last row `average` over the tasks.

Each task is scored by its official metric, as the released `post_expert_eval.py` / `clipeval/eval_zeroshot.py`
do: mean per-class accuracy for FGVC-Aircraft, Oxford-IIIT Pets, Caltech-101 and Flowers-102 (recognised by the
task name: `fgvc_aircraft`, `FGVCAircraft`, `oxford_pets`, `caltech-101`, `flowers102`, ...), top-1 otherwise
(`--metric` overrides); the last column, `metric`, names it per row.

    hf-moe mode report --model OUT --tasks TASK_DIR [TASK_DIR ...] [--output report.csv] [--task_names ...]
        [--class_names NAMES [NAMES ...]] [--templates auto|default|imagenet|FILE] [--batch_size 64]

Each task is a class-folder image set (as `hf-moe eval zero-shot` takes). Every image is encoded once by every
expert; all columns reuse those features. The expert columns are what `hf-moe eval zero-shot` gives for that expert
CLIP alone; accuracies are fractions in [0, 1] (the `top1_accuracy` / `mean_per_class_accuracy` of `hf-moe eval`),
not the released percents.
"""

import csv
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from ..arguments import parse_command_line
from ..evaluation import (
    AUTO_TEMPLATES,
    EvalMode,
    check_batch_size,
    dataset_class_names,
    ensemble_cosines,
    load_image_dataset,
    resolve_templates,
    templates_option,
)
from ..fileio import atomic_output_file
from ..loading import device_option
from ..metrics import load_metric


logger = logging.get_logger(__name__)

MODE_MODEL_TYPE = "mode"
AVERAGE_ROW = "average"
DEFAULT_OUTPUT_NAME = "mode_report.csv"
TOP1 = "top1_accuracy"
MEAN_PER_CLASS = "mean_per_class_accuracy"
METRICS = {"top1": TOP1, "mean_per_class": MEAN_PER_CLASS}
AUTO_METRIC = "auto"
# The datasets the official protocol scores by mean per-class accuracy (MetaCLIP mode/post_expert_eval.py:
# ['FGVCAircraft', 'OxfordPets', 'Caltech101', 'Flowers102'], the CLIP paper's table 9), as task names normalised
# by `_normalised_name`: full names matched anywhere in the name, short ones only as the whole name.
MEAN_PER_CLASS_NAMES = ("fgvcaircraft", "oxfordpets", "oxfordiiitpet", "caltech101", "flowers102")
MEAN_PER_CLASS_SHORT_NAMES = ("aircraft", "pets", "pet", "flowers", "caltech")


def _normalised_name(name: str) -> str:
    """`tanganke/FGVC_Aircraft-test` -> `fgvcaircrafttest`: the last path part, lower case, letters and digits."""
    return re.sub(r"[^a-z0-9]", "", str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower())


def official_metric(name: str) -> str:
    """The metric the official report uses for the task `name`: `mean_per_class_accuracy` for FGVC-Aircraft,
    Oxford-IIIT Pets, Caltech-101 and Flowers-102, else `top1_accuracy`."""
    normalised = _normalised_name(name)
    if any(full in normalised for full in MEAN_PER_CLASS_NAMES) or normalised in MEAN_PER_CLASS_SHORT_NAMES:
        return MEAN_PER_CLASS
    return TOP1


@dataclass
class ReportArguments:
    """The options of `hf-moe mode report`; `evaluate_task` reads its keyword defaults from here (declared once)."""

    model: str = field(metadata={"help": "MoDE model: a folder of `hf-moe mode build` or a Hub id."})
    tasks: list[str] = field(metadata={"help": "Class-folder image sets (as `hf-moe eval zero-shot` takes)."})
    output: str | None = field(
        default=None,
        metadata={
            "help": f"CSV file (default: MODEL/{DEFAULT_OUTPUT_NAME} for a local MODEL, else ./{DEFAULT_OUTPUT_NAME})."
        },
    )
    task_names: list[str] | None = field(
        default=None, metadata={"help": "The `dataset` cell of each task, in --tasks order (default: folder names)."}
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names as `hf-moe eval zero-shot --class_names` takes them: one value for every task, or "
            "one per task in --tasks order ('folders': the folder names). Default: the folder names."
        },
    )
    templates: str = field(
        default=AUTO_TEMPLATES,
        metadata={
            "help": "Prompt templates, for the experts and the clustering encoder alike: 'auto', 'default', 'imagenet' "
            "or a text file with one template per line ('{}' for the class name); see `hf-moe eval zero-shot`."
        },
    )
    metric: list[str] | None = field(
        default=None,
        metadata={
            "help": f"The metric of each task: {AUTO_METRIC} (the official one: mean per-class accuracy for "
            "FGVC-Aircraft, Oxford-IIIT Pets, Caltech-101 and Flowers-102 by task name, else top-1), top1 or "
            "mean_per_class; one value for every task, or one per task in --tasks order. Default: auto."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Images or texts per forward pass."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})


@dataclass
class TaskReport:
    """One task's report row (`row`: column -> value), the task weights used for `ensemble` (`(num_experts,)`) and
    the predicted label of every image under each prediction column (`expert-k`, `all_unit`, `ensemble`)."""

    row: dict
    task_weights: torch.Tensor
    predictions: dict[str, list[int]] = field(repr=False)


def evaluate_task(
    model,
    processor,
    data,
    class_names=None,
    templates: str | Sequence[str] | None = ReportArguments.templates,
    batch_size: int = ReportArguments.batch_size,
    device=ReportArguments.device,
    name: str | None = None,
    progress: bool = True,
    metric: str | None = None,
) -> TaskReport:
    """The report row of one zero-shot task for a `MoDEModel`.

    Args:
        model: A `MoDEModel`.
        processor: Its processor (the model folder's: a CLIP image processor and the `MoDETokenizer`).
        data, class_names, templates: As for `hf_moe.evaluation.zero_shot_classification`; the same templates
            embed the class names for the experts and for the clustering encoder.
        batch_size: Images or texts per forward pass.
        device: Move the model there first; default: leave it where it is.
        name: The `dataset` cell (default: the folder name of `data`).
        progress: Show tqdm progress bars.
        metric: `top1_accuracy` or `mean_per_class_accuracy` (or `top1` / `mean_per_class`); default: the task's
            official metric by its name (`official_metric`). The row's `metric` cell names it.
    """
    check_batch_size(batch_size)
    dataset = load_image_dataset(data)
    names, class_name_set = dataset_class_names(dataset, class_names)
    templates = resolve_templates(templates, class_name_set)
    references = torch.tensor([int(label) for label in dataset.select_columns(["label"])[:]["label"]])
    if len(references) == 0:
        raise ValueError(f"Task '{name or data}' has no images.")
    dataset_name = name if name is not None else (Path(data).name if isinstance(data, (str, Path)) else "data")
    metric = _metric_option(metric, dataset_name)
    with EvalMode(model, device):
        # Shared with `hf-moe eval zero-shot`, whose accuracy on a MoDE model is this report's `ensemble` column.
        cosines, weights = ensemble_cosines(model, processor, dataset, names, templates, batch_size, device, progress)
    num_experts = cosines.shape[0]
    predictions = {f"expert-{k}": cosines[k].argmax(dim=-1).tolist() for k in range(num_experts)}
    # The released code ensembles the experts' cosine logits: their mean, and their sum weighted by the task weights.
    predictions["all_unit"] = cosines.mean(dim=0).argmax(dim=-1).tolist()
    predictions["ensemble"] = (weights[:, None, None] * cosines).sum(dim=0).argmax(dim=-1).tolist()
    scorer = load_metric("accuracy" if metric == TOP1 else MEAN_PER_CLASS)
    key = "accuracy" if metric == TOP1 else MEAN_PER_CLASS
    scores = {
        column: float(scorer.compute(predictions=predicted, references=references.tolist())[key])
        for column, predicted in predictions.items()
    }
    experts = [scores[f"expert-{k}"] for k in range(num_experts)]
    row = {
        "dataset": dataset_name,
        "num_classes": len(names),
        **{f"expert-{k}": score for k, score in enumerate(experts)},
        "expert-max": max(experts),
        "all_unit": scores["all_unit"],
        "ensemble": scores["ensemble"],
        "metric": metric,
    }
    logger.info(f"{row['dataset']}: task weights {[round(w, 4) for w in weights.tolist()]}")
    return TaskReport(row=row, task_weights=weights, predictions=predictions)


def _metric_option(metric: str | None, name: str) -> str:
    if metric is None or metric == AUTO_METRIC:
        return official_metric(name)
    metric = METRICS.get(metric, metric)
    if metric not in METRICS.values():
        raise ValueError(f"Unknown metric {metric!r} for task '{name}'; choose {AUTO_METRIC}, {', '.join(METRICS)}.")
    return metric


def average_row(rows: Sequence[dict]) -> dict:
    """The last row of the report: the mean of every numeric column over the tasks (num_classes included, as the
    released report has it); its `metric` cell is the tasks' metric, or `mixed` (the mean of what each row reports,
    as the released average)."""
    columns = [column for column in rows[0] if column not in ("dataset", "metric")]
    average = {"dataset": AVERAGE_ROW, **{column: sum(row[column] for row in rows) / len(rows) for column in columns}}
    if "metric" in rows[0]:
        metrics = {row["metric"] for row in rows}
        average["metric"] = metrics.pop() if len(metrics) == 1 else "mixed"
    return average


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as an aligned markdown table (numbers right-aligned, 4 decimals)."""
    columns = list(rows[0])
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def line(values, numeric):
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    numeric = [column not in ("dataset", "metric") for column in columns]
    rule = "|" + "|".join("-" * (w + 1) + (":" if num else "-") for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns, [False] * len(columns)), rule, *(line(values, numeric) for values in cells)])


def write_report(rows: Sequence[dict], path: str | Path) -> Path:
    """Write the rows as CSV to `path` atomically (floats at full precision: they read back exactly)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path).expanduser()
    with atomic_output_file(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


# `--class_names folders` for one task among several: that task keeps its folder names.
FOLDER_CLASS_NAMES = "folders"


def _per_task(values: list[str] | None, num_tasks: int, option: str) -> list:
    if values is None:
        return [None] * num_tasks
    if len(values) == 1:
        return values * num_tasks
    if len(values) != num_tasks:
        raise ValueError(f"{option} takes one value or one per task: got {len(values)} for {num_tasks} tasks.")
    return list(values)


def _load_task(folder: str, class_names):
    """The task's dataset and templates set, with any problem reported against the task folder."""
    try:
        dataset = load_image_dataset(folder)
        return dataset, dataset_class_names(dataset, class_names)[1]
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(f"Task folder '{folder}' (a class-folder image set is needed): {err}") from err


def default_report_path(model: str) -> Path:
    model_dir = Path(model).expanduser()
    return (model_dir if model_dir.is_dir() else Path.cwd()) / DEFAULT_OUTPUT_NAME


def main(argv: list[str] | None = None) -> list[dict]:
    """`hf-moe mode report`: evaluate, print the table, write the CSV and return its rows (the average last)."""
    from transformers import AutoProcessor, HfArgumentParser

    from ..loading import load_config, load_pretrained

    parser = HfArgumentParser(
        ReportArguments,
        prog="hf-moe mode report",
        description="Per-expert, best-expert, uniform and task-adaptive ensemble zero-shot accuracy of a MoDE model "
        "on class-folder tasks, as a CSV (the released MoDE report) and a printed table.",
    )
    (args,) = parse_command_line(parser, argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}.")
    if args.task_names is not None and len(args.task_names) != len(args.tasks):
        raise ValueError(f"--task_names needs one name per task: got {len(args.task_names)} for {len(args.tasks)}.")
    names = args.task_names or [Path(task).expanduser().resolve().name for task in args.tasks]
    repeated = sorted({name for name in names if names.count(name) > 1 or name == AVERAGE_ROW})
    if repeated:
        raise ValueError(
            f"Task names must be unique and not '{AVERAGE_ROW}' (the last row); {repeated} is not: name the tasks "
            "with --task_names."
        )
    class_names = [
        None if value == FOLDER_CLASS_NAMES else value
        for value in _per_task(args.class_names, len(args.tasks), "--class_names")
    ]
    templates = templates_option(args.templates)
    metrics = [
        _metric_option(value, name) for value, name in zip(_per_task(args.metric, len(args.tasks), "--metric"), names)
    ]

    # Every task, its class names and the model type are checked before the model is loaded and anything written.
    tasks = [_load_task(folder, names_option) for folder, names_option in zip(args.tasks, class_names)]
    for (dataset, class_name_set), folder in zip(tasks, args.tasks):
        if len(dataset) == 0:
            raise ValueError(f"Task folder '{folder}' holds no images.")
        resolve_templates(templates, class_name_set)
    config = load_config(args.model)
    if config.model_type != MODE_MODEL_TYPE:
        raise ValueError(
            f"'{args.model}' is a '{config.model_type}' model, not a MoDE model (model_type '{MODE_MODEL_TYPE}'): "
            "pass the folder `hf-moe mode build` wrote."
        )
    output = Path(args.output).expanduser() if args.output else default_report_path(args.model)

    model = load_pretrained(args.model, config=config)
    processor = AutoProcessor.from_pretrained(args.model)
    device = device_option(args.device)
    rows = [
        evaluate_task(
            model,
            processor,
            dataset,
            class_names=names_option,
            templates=templates,
            batch_size=args.batch_size,
            device=device,
            name=name,
            metric=metric,
        ).row
        for (dataset, _), names_option, name, metric in zip(tasks, class_names, names, metrics)
    ]
    rows.append(average_row(rows))
    write_report(rows, output)
    if Path(args.model).is_dir():  # a local model folder: its card records the scores, as `hf-moe eval` does
        from ..hub import add_eval_results

        for row in rows[:-1]:
            metrics = {f"{column}_{row['metric']}": value for column, value in row.items() if isinstance(value, float)}
            add_eval_results(args.model, metrics, task="zero-shot-image-classification", dataset=row["dataset"])
    print(format_table(rows))
    print(f"Wrote {output}", file=sys.stderr)
    return rows

"""`hf-moe analyze-routing` for MoDE: which data experts each evaluation task is given to, and how much of the
clustering each expert holds.

MoDE routes per task, not per input: a task's class names (each under every prompt template, embedded by the
clustering encoder and averaged over the templates, as the released code and `hf-moe eval` / `hf-moe mode report`
compute them: `hf_moe.evaluation.class_task_weights`) are placed among the fine cluster centers, and the experts of the
nearest centers get the weight. The tasks come from `--data`:

- a folder of task folders, each a class-folder image set (the class names are its sub-folders' names, as `hf-moe
  eval zero-shot` reads them; a task folder with `train` / `test` / `validation` sub-folders uses `--split`, default
  test, else validation, else the only one), or a single class folder (one task, named after the folder);
- or a JSON file `{task: [class names]}` or `{task: {"class_names": [...], "templates": [...] | "imagenet" |
  "default"}}`; `--class_names FILE.json` (same format) adds tasks, or replaces the class names of a task of the same
  name.

Without templates the task's names get `hf-moe eval`'s "auto" templates (OpenAI's ImageNet ones for ImageNet names,
else the default eight). No image is read: the weights depend on the class names only.

Numbers: per task its class names, templates and expert weights; per expert its fine clusters (the model's own
`fine_to_coarse`) and, with `--clusters` (the `hf-moe mode cluster` folder the model was built from, checked against
the model's centers), its training pairs. Figures: a heatmap of experts x tasks, bars of fine clusters per expert and
(with `--clusters`) of pairs per expert.
"""

import json
from pathlib import Path

import torch

from ..loading import device_option, dtype_option
from ..routing_report import Heatmap, RoutingArguments, RoutingReport, StackedBars


MODE_MODEL_TYPE = "mode"
SPLIT_FOLDERS = ("test", "validation", "val", "train")


def _sub_folders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _class_folder_names(folder: Path, split: str | None) -> list[str]:
    """The class sub-folder names of a task folder (those of its split folder when it is split)."""
    subs = _sub_folders(folder)
    names = [sub.name for sub in subs]
    if subs and all(name in SPLIT_FOLDERS for name in names):
        choice = split or next((name for name in ("test", "validation", "val") if name in names), None)
        if choice is None and len(names) == 1:
            choice = names[0]
        if choice not in names:
            raise ValueError(
                f"Task folder '{folder}' has the splits {names}; choose one with --split (the class names are the "
                "sub-folders of the split)."
            )
        return _class_folder_names(folder / choice, None)
    if not names:
        raise ValueError(
            f"Task folder '{folder}' has no class sub-folders: a task is a class-folder image set "
            "(TASK/CLASS_A/*.png, TASK/CLASS_B/*.png), whose sub-folder names are the class names."
        )
    return names


def _is_class_folder(folder: Path) -> bool:
    """Whether `folder` is one class-folder task (its sub-folders hold files, not folders), rather than a folder of
    task folders."""
    subs = _sub_folders(folder)
    if not subs or all(sub.name in SPLIT_FOLDERS for sub in subs):
        return True
    return all(not _sub_folders(sub) for sub in subs)


def read_task_file(path: str | Path) -> dict[str, dict]:
    """`{task: {"class_names": [...], "templates": value or None}}` from a JSON file `{task: [names]}` or `{task:
    {"class_names": [...], "templates": ...}}`; a `ValueError` naming the file and task otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Class-names file '{path}' does not exist.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is not a JSON file of tasks' class names ({err}).") from None
    form = 'a JSON object {task: [class names]} or {task: {"class_names": [...], "templates": [...]}}'
    if not isinstance(content, dict) or not content:
        raise ValueError(f"'{path}' must be {form}; got {type(content).__name__} {content!r:.80}.")
    tasks = {}
    for task, value in content.items():
        templates = None
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"class_names", "templates"})
            if unknown or "class_names" not in value:
                raise ValueError(f"'{path}', task '{task}': keys must be 'class_names' and optionally 'templates'.")
            value, templates = value["class_names"], value.get("templates")
        if not isinstance(value, list) or not value or not all(isinstance(name, str) and name for name in value):
            raise ValueError(f"'{path}', task '{task}': the class names must be a non-empty list of strings.")
        tasks[task] = {"class_names": list(value), "templates": templates, "source": str(path)}
    return tasks


def read_tasks(data: str | Path, class_names: str | Path | None = None, split: str | None = None) -> dict[str, dict]:
    """The tasks of `--data` and `--class_names` (see the module docstring): `{task: {"class_names", "templates",
    "class_name_set", "source"}}`, templates not yet resolved."""
    from ..class_names import resolve_class_names

    path = Path(data).expanduser()
    if path.is_file():
        tasks = read_task_file(path)
    elif not path.is_dir():
        raise FileNotFoundError(f"Data '{data}' does not exist (a folder of task folders, a class folder or a JSON).")
    else:
        folders = [path] if _is_class_folder(path) else _sub_folders(path)
        tasks = {}
        for folder in folders:
            names, name_set = resolve_class_names(_class_folder_names(folder, split), None)
            tasks[folder.name] = {
                "class_names": names,
                "templates": None,
                "class_name_set": name_set,
                "source": str(folder),
            }
    if class_names is not None:
        tasks.update(read_task_file(class_names))
    return tasks


def resolve_task_templates(tasks: dict[str, dict]) -> dict[str, dict]:
    """Each task with its templates resolved as `hf-moe eval` resolves them (`resolve_templates`)."""
    from ..evaluation import resolve_templates

    resolved = {}
    for task, spec in tasks.items():
        try:
            templates = resolve_templates(spec["templates"], spec.get("class_name_set"))
        except ValueError as err:
            raise ValueError(f"'{spec['source']}', task '{task}': {err}") from None
        resolved[task] = {**spec, "templates": list(templates)}
    return resolved


def fine_clusters_per_expert(fine_to_coarse: torch.Tensor, num_experts: int) -> list[int]:
    """How many fine cluster centers belong to each expert."""
    return torch.bincount(fine_to_coarse.long().cpu(), minlength=num_experts).tolist()


def check_clusters_fit_config(clusters: str | Path, config, model: str):
    """The `hf-moe mode cluster` folder `clusters` read (`load_cluster_folder`), refused with a one-line error naming
    its file when its counts are not the model's (before the model is loaded)."""
    from .cluster_files import CLUSTERS_FILE, load_cluster_folder

    folder = load_cluster_folder(clusters)
    ours = (config.num_fine_clusters, config.num_experts)
    theirs = (folder.info["num_fine_clusters"], folder.info["num_experts"])
    if ours != theirs:
        raise ValueError(
            f"{Path(clusters) / CLUSTERS_FILE} holds {theirs[0]} fine clusters and {theirs[1]} experts, but the model "
            f"'{model}' has {ours[0]} and {ours[1]}: --clusters must be the `hf-moe mode cluster` folder the model was "
            "built from."
        )
    return folder


def check_clusters_match_model(clusters: str | Path, folder, model) -> None:
    """Refuse a clusters folder whose fine centers or fine -> coarse map are not the model's, naming its file."""
    from .cluster_files import CENTERS_FILE

    centers = folder.centers["fine_centers"].float()
    same = centers.shape == model.fine_centers.shape and torch.allclose(
        centers, model.fine_centers.float().cpu(), atol=1e-6, rtol=1e-5
    )
    if not same or not torch.equal(folder.centers["fine_to_coarse"].long(), model.fine_to_coarse.long().cpu()):
        raise ValueError(
            f"{Path(clusters) / CENTERS_FILE}: its fine centers or their experts are not the model's: --clusters must "
            "be the `hf-moe mode cluster` folder the model was built from."
        )


def pairs_per_expert(clusters: str | Path, folder) -> list[int]:
    """The training pairs of each expert: counted from the folder's assignments (`assignments/part-*.parquet`), or,
    without them, `expert_sizes` of its clusters.json."""
    from .cluster_files import CLUSTERS_FILE
    from .data import ASSIGNMENTS_DIR, read_assignments

    num_experts = folder.info["num_experts"]
    if any((Path(clusters) / ASSIGNMENTS_DIR).glob("part-*.parquet")):
        coarse = read_assignments(clusters, ("coarse",)).column("coarse").to_numpy().astype("int64")
        return torch.bincount(torch.from_numpy(coarse), minlength=num_experts).tolist()
    sizes = folder.info.get("expert_sizes")
    if not isinstance(sizes, list) or len(sizes) != num_experts:
        raise ValueError(
            f"{Path(clusters) / CLUSTERS_FILE} has no 'expert_sizes' and {Path(clusters) / ASSIGNMENTS_DIR} no "
            "assignments: the pairs per expert are unknown (pass the folder `hf-moe mode cluster` wrote)."
        )
    return [int(size) for size in sizes]


def expert_labels(num_experts: int) -> list[str]:
    return [f"expert {index}" for index in range(num_experts)]


def routing_figures(numbers: dict) -> list:
    """The heatmap of task weights (experts x tasks) and the bars of fine clusters (and pairs) per expert."""
    tasks = list(numbers["tasks"])
    experts = expert_labels(len(numbers["fine_clusters_per_expert"]))
    figures = [
        Heatmap(
            name="mode_task_weights",
            title="MoDE: expert weights per evaluation task",
            matrix=[[numbers["tasks"][task]["task_weights"][k] for task in tasks] for k in range(len(experts))],
            row_labels=experts,
            column_labels=tasks,
            xlabel="evaluation task",
            ylabel="data expert",
            caption="Each column sums to 1: the weights MoDE ensembles the experts with on that task, from its class "
            "names averaged over its templates (as `hf-moe eval` and `hf-moe mode report` weigh them).",
            value_format=".3f",
        ),
        StackedBars(
            name="mode_fine_clusters_per_expert",
            title="MoDE: fine clusters per data expert",
            categories=experts,
            series={"fine clusters": numbers["fine_clusters_per_expert"]},
            xlabel="data expert",
            ylabel="fine cluster centers",
            caption="How many fine cluster centers each expert owns (the model's fine_to_coarse): a task's class names "
            "near these centers weigh this expert.",
        ),
    ]
    if numbers.get("pairs_per_expert") is not None:
        figures.append(
            StackedBars(
                name="mode_pairs_per_expert",
                title="MoDE: training pairs per data expert",
                categories=experts,
                series={"image-text pairs": numbers["pairs_per_expert"]},
                xlabel="data expert",
                ylabel="image-text pairs",
                caption="The pairs of each expert's coarse cluster in the clustering the model was built from.",
            )
        )
    return figures


def analyze_routing(args: RoutingArguments, progress: bool = True) -> RoutingReport:
    """`hf-moe analyze-routing` on a MoDE model (see the module docstring)."""
    from transformers import AutoProcessor

    from ..evaluation import EvalMode, class_task_weights
    from ..loading import load_config, load_pretrained

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}.")
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    if config.model_type != MODE_MODEL_TYPE:
        raise ValueError(f"'{args.model}' is a '{config.model_type}' model, not a MoDE model.")
    # Tasks and clusters are checked before the model is loaded.
    tasks = resolve_task_templates(read_tasks(args.data, args.class_names, args.split))
    if not tasks:
        raise ValueError(f"'{args.data}' holds no task.")
    folder = check_clusters_fit_config(args.clusters, config, args.model) if args.clusters else None

    device = device_option(args.device)
    model = load_pretrained(args.model, trust_remote_code=args.trust_remote_code, dtype=dtype_option(args.dtype))
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    pairs = None
    if folder is not None:
        check_clusters_match_model(args.clusters, folder, model)
        pairs = pairs_per_expert(args.clusters, folder)

    numbers = {"ensemble_formula": config.ensemble_formula, "tasks": {}}
    with EvalMode(model, device):
        for task, spec in tasks.items():
            weights = class_task_weights(
                model, tokenizer, spec["class_names"], spec["templates"], args.batch_size, device, progress
            )
            numbers["tasks"][task] = {
                "class_names": spec["class_names"],
                "templates": spec["templates"],
                "source": spec["source"],
                "task_weights": weights.tolist(),
            }
    numbers["fine_clusters_per_expert"] = fine_clusters_per_expert(model.fine_to_coarse, config.num_experts)
    numbers["pairs_per_expert"] = pairs
    notes = [
        f"Task weights: the `{config.ensemble_formula}` formula over {config.num_fine_clusters} fine cluster centers "
        f"and {config.num_experts} experts; each task's class names under each of its templates, embedded by the "
        "clustering encoder and averaged over the templates."
    ]
    if pairs is None:
        notes.append(
            "The pairs per expert are not shown: pass the `hf-moe mode cluster` folder the model was built from "
            f"(`hf-moe analyze-routing --model {args.model} --data {args.data} --clusters CLUSTERS_DIR ...`)."
        )
    classes = sum(len(spec["class_names"]) for spec in tasks.values())
    return RoutingReport(
        model=args.model,
        model_type=config.model_type,
        data=args.data,
        data_description=f"{len(tasks)} tasks ({', '.join(tasks)}), {classes} class names in all",
        num_samples=len(tasks),
        numbers=numbers,
        figures=routing_figures(numbers),
        notes=notes,
    )


__all__ = [
    "analyze_routing",
    "check_clusters_fit_config",
    "check_clusters_match_model",
    "fine_clusters_per_expert",
    "pairs_per_expert",
    "read_task_file",
    "read_tasks",
    "resolve_task_templates",
    "routing_figures",
]

"""`hf-moe analyze-routing` for WEMoE / E-WEMoE: per-sample routing weights, per data task and task vector.

Every WEMoE block's router gives each image one weight per task vector (`output_routing_weights=True`: one
`(batch, num_tasks)` tensor per block; unbounded, not softmaxed; the block's MLP is `pretrained + sum_i w_i *
task_vector_i`). The data is a folder of task folders (the layout `hf-moe tta-wemoe --tasks` reads: one class-folder
image set per task, named like the model's tasks) or one image folder (a single data task).

    hf-moe analyze-routing --model WEMOE_DIR --data TASKS_DIR --output_dir DIR

Figures: per block, and averaged over the blocks, the mean weight of each data task (rows) on each task vector
(columns); per block, the spread of the per-sample weights (box plots per task vector, one box per data task).

Whether the routers separate the tasks, in routing.json's `numbers`:
- `own_task_accuracy` (where data tasks are named like the model's stored `task_names`, up to case and
  punctuation): the fraction of the matched tasks' samples whose largest weight is on their own task's vector, per
  block and for the weights averaged over the blocks (chance: 1 / num_tasks);
- `nearest_centroid_accuracy` (any two or more data tasks): the fraction of samples whose routing weights
  (all blocks concatenated) are nearer (Euclidean) their own data task's mean than any other data task's mean (chance
  about 1 / num_data_tasks; 1.0: the data tasks' routing weights form separate clusters).
"""

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..evaluation import load_image_dataset, to_rgb_image
from ..loading import device_option, dtype_option
from ..routing_report import (
    Heatmap,
    RoutingArguments,
    RoutingReport,
    Spread,
    batch_ranges,
    first_per_group,
)


logger = logging.get_logger(__name__)

MODEL_TYPES = ("we_moe", "we_moe_vision_model")
SPLIT_NAMES = {"train", "test", "validation", "valid", "val", "eval"}


# ----------------------------------------------------------------------------------------------------------------
# The numbers, from model outputs
# ----------------------------------------------------------------------------------------------------------------


def stack_routing_weights(routing_weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`(batch, num_blocks, num_tasks)` float64 from a WEMoE output's `routing_weights` (one `(batch, num_tasks)`
    tensor per WEMoE block)."""
    return torch.stack([weights.detach().float().cpu() for weights in routing_weights], dim=1).to(torch.float64)


def mean_weights(weights: torch.Tensor, data_tasks: list[int], num_data_tasks: int) -> torch.Tensor:
    """`(num_blocks, num_data_tasks, num_tasks)`: per block, each data task's mean routing weight on each task
    vector, from the per-sample `weights` `(num_samples, num_blocks, num_tasks)` and each sample's data task."""
    labels = torch.as_tensor(data_tasks, dtype=torch.long)
    sums = torch.zeros(num_data_tasks, *weights.shape[1:], dtype=weights.dtype).index_add_(0, labels, weights)
    counts = torch.bincount(labels, minlength=num_data_tasks).to(weights.dtype).clamp_min(1)
    return (sums / counts[:, None, None]).transpose(0, 1)


def own_task_accuracy(weights: torch.Tensor, own_vector: list[int | None]) -> dict | None:
    """The fraction of samples whose largest routing weight is on their own task's vector (`own_vector[i]`: the
    task-vector index of sample i's data task, None where the model has no such task; those samples are left out):
    per block, and for the weights averaged over the blocks. None when no sample has an own vector."""
    keep = [i for i, vector in enumerate(own_vector) if vector is not None]
    if not keep:
        return None
    selected = weights[keep]
    targets = torch.as_tensor([own_vector[i] for i in keep])
    per_block = (selected.argmax(dim=-1) == targets[:, None]).to(torch.float64).mean(dim=0)
    overall = (selected.mean(dim=1).argmax(dim=-1) == targets).to(torch.float64).mean()
    return {"per_block": per_block.tolist(), "all_blocks": overall.item(), "num_samples": len(keep)}


def nearest_centroid_accuracy(weights: torch.Tensor, data_tasks: list[int], num_data_tasks: int) -> float | None:
    """The fraction of samples whose routing weights (all blocks, flattened) are nearer their own data task's mean
    than any other's (Euclidean; ties count as wrong); None with fewer than two data tasks."""
    if num_data_tasks < 2:
        return None
    flat = weights.reshape(weights.shape[0], -1)
    labels = torch.as_tensor(data_tasks, dtype=torch.long)
    centroids = torch.zeros(num_data_tasks, flat.shape[1], dtype=flat.dtype).index_add_(0, labels, flat)
    centroids = centroids / torch.bincount(labels, minlength=num_data_tasks).to(flat.dtype).clamp_min(1)[:, None]
    distances = torch.cdist(flat, centroids)  # (samples, data tasks)
    own = distances.gather(1, labels[:, None])
    others = distances.scatter(1, labels[:, None], float("inf"))
    return (own < others.min(dim=1, keepdim=True).values).to(torch.float64).mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _has_subfolders(folder: Path) -> bool:
    return any(entry.is_dir() and not entry.name.startswith(".") for entry in folder.iterdir())


def task_folders(data: str | Path) -> dict[str, Path]:
    """{data task name: folder}: the sub-folders of `data` when each is an image set of its own (it has
    sub-folders: classes or splits), else `data` itself as one task (a class folder, or images alone)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder '{data}' does not exist.")
    children = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if children and all(_has_subfolders(child) for child in children):
        if not {child.name.lower() for child in children} <= SPLIT_NAMES:  # train/ test/ of one task
            return {child.name: child for child in children}
    return {root.resolve().name: root}


def _name_key(name: str) -> str:
    return "".join(char for char in name.lower() if char.isalnum())


def match_task_vectors(data_tasks: list[str], stored: list[str] | None) -> list[int | None]:
    """For each data task, the index of the model's task vector of the same name (exact, else equal up to case and
    punctuation where that names one stored task), or None."""
    if not stored:
        return [None] * len(data_tasks)
    keys: dict[str, list[int]] = {}
    for index, name in enumerate(stored):
        keys.setdefault(_name_key(name), []).append(index)
    matched = []
    for name in data_tasks:
        if name in stored:
            matched.append(stored.index(name))
        else:
            candidates = keys.get(_name_key(name), [])
            matched.append(candidates[0] if len(candidates) == 1 else None)
    return matched


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


@torch.inference_mode()
def route(model, image_processor, datasets: dict, batch_size: int, device, progress: bool = True) -> torch.Tensor:
    """Per-sample routing weights `(num_samples, num_blocks, num_tasks)` of every image of `datasets` ({task:
    dataset}), in order (task by task)."""
    vision = model.vision_model if hasattr(model, "text_model") else model
    dtype = next(model.parameters()).dtype
    jobs = [(dataset, rows) for dataset in datasets.values() for rows in batch_ranges(len(dataset), batch_size)]
    parts = []
    for dataset, rows in tqdm(jobs, desc="Routing", unit="batch", disable=not progress):
        images = [to_rgb_image(image) for image in dataset.select_columns(["image"])[rows.start : rows.stop]["image"]]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
        output = vision(pixel_values=pixels, output_routing_weights=True)
        parts.append(stack_routing_weights(output.routing_weights))
    return torch.cat(parts)


def routing_numbers(weights: torch.Tensor, data_tasks: list[int], task_names: list[str], vectors: list[str], blocks):
    """routing.json's `numbers` from the per-sample weights `(num_samples, num_blocks, num_tasks)`."""
    means = mean_weights(weights, data_tasks, len(task_names))
    own_vector = match_task_vectors(task_names, vectors)
    numbers = {
        "blocks": list(blocks),
        "data_tasks": list(task_names),
        "task_vectors": list(vectors),
        "samples_per_data_task": torch.bincount(torch.as_tensor(data_tasks), minlength=len(task_names)).tolist(),
        "data_task_vector": {name: (vectors[i] if i is not None else None) for name, i in zip(task_names, own_vector)},
        "mean_weights": means.tolist(),  # [block][data task][task vector]
        # [data task][task vector]: the per-sample weights averaged over the blocks, then over each data task
        "mean_weights_all_blocks": mean_weights(weights.mean(dim=1, keepdim=True), data_tasks, len(task_names))[
            0
        ].tolist(),
        "own_task_accuracy": own_task_accuracy(weights, [own_vector[task] for task in data_tasks]),
        "nearest_centroid_accuracy": nearest_centroid_accuracy(weights, data_tasks, len(task_names)),
        "per_sample_weights": {
            name: weights[[i for i, task in enumerate(data_tasks) if task == position]].tolist()
            for position, name in enumerate(task_names)
        },  # [data task][sample][block][task vector]
    }
    return numbers


def routing_figures(numbers: dict, model_name: str) -> list:
    vectors, tasks = numbers["task_vectors"], numbers["data_tasks"]
    columns = [f"{name}" for name in vectors]
    separation = _separation_text(numbers)
    figures = [
        Heatmap(
            name="we_moe_task_routing",
            title=f"WEMoE: mean routing weight of each data task on each task vector, all blocks{separation}",
            matrix=numbers["mean_weights_all_blocks"],
            row_labels=list(tasks),
            column_labels=columns,
            xlabel="task vector",
            ylabel="data task",
            caption=f"Per data task (rows), the mean over its images and over the {len(numbers['blocks'])} WEMoE "
            f"blocks of {model_name} of the routing weight on each task vector (columns). A router that separates "
            "the tasks puts each data task's largest weight on its own vector.",
            value_format=".3f",
        )
    ]
    for position, block in enumerate(numbers["blocks"]):
        figures.append(
            Heatmap(
                name=f"we_moe_block{block}_task_routing",
                title=f"WEMoE block {block}: mean routing weight of each data task on each task vector",
                matrix=numbers["mean_weights"][position],
                row_labels=list(tasks),
                column_labels=columns,
                xlabel="task vector",
                ylabel="data task",
                caption=f"Per data task, the mean routing weight of its images on each task vector in block {block}.",
                value_format=".3f",
            )
        )
    for position, block in enumerate(numbers["blocks"]):
        groups = {
            task: [
                [sample[position][vector] for sample in numbers["per_sample_weights"][task]]
                for vector in range(len(vectors))
            ]
            for task in tasks
        }
        figures.append(
            Spread(
                name=f"we_moe_block{block}_weight_spread",
                title=f"WEMoE block {block}: per-sample routing weights by task vector and data task",
                positions=columns,
                groups=groups,
                xlabel="task vector",
                ylabel="routing weight",
                caption=f"The distribution over images of the routing weight on each task vector in block {block}, one "
                "box per data task: boxes of different data tasks that do not overlap mean the router tells the "
                "tasks apart.",
            )
        )
    return figures


def _separation_text(numbers: dict) -> str:
    own = numbers["own_task_accuracy"]
    if own is not None:
        return f" (own task's vector largest for {own['all_blocks']:.0%} of images)"
    if numbers["nearest_centroid_accuracy"] is not None:
        return f" (nearest-centroid separation {numbers['nearest_centroid_accuracy']:.0%})"
    return ""


def analyze_routing(args: RoutingArguments, progress: bool = True) -> RoutingReport:
    """Route the images of `args.data` through the WEMoE `args.model` and return the report (module docstring)."""
    from ..loading import check_model_type, load_config, load_pretrained, load_processor

    folders = task_folders(args.data)  # before the model: a wrong path fails at once
    datasets = {}
    for name, folder in folders.items():
        dataset = load_image_dataset(folder, args.split)
        groups = dataset["label"] if "label" in dataset.column_names else [0] * len(dataset)
        keep = first_per_group(groups, args.max_samples)
        datasets[name] = dataset.select(keep) if len(keep) != len(dataset) else dataset
        if len(datasets[name]) == 0:
            raise ValueError(f"Data task '{name}' ({folder}) holds no images to route.")
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    check_model_type(config, args.model, MODEL_TYPES, "WEMoE's routing analysis")
    vision_config = _vision_config(config)
    stored = list(vision_config.task_names) if vision_config.task_names else None
    vectors = stored or [f"task {i}" for i in range(vision_config.num_tasks)]
    device = device_option(args.device)
    model = load_pretrained(
        args.model, config=config, dtype=dtype_option(args.dtype), trust_remote_code=args.trust_remote_code
    )
    model = model.to(device).eval()
    processor = load_processor(args.model)
    if processor is None:
        raise OSError(f"'{args.model}' has no image processor to prepare the images.")
    image_processor = getattr(processor, "image_processor", processor)
    weights = route(model, image_processor, datasets, args.batch_size, device, progress)
    task_names = list(datasets)
    data_tasks = [position for position, dataset in enumerate(datasets.values()) for _ in range(len(dataset))]
    numbers = routing_numbers(weights, data_tasks, task_names, vectors, vision_config.moe_layer_indices())
    sizes = ", ".join(f"{name} {len(dataset)}" for name, dataset in datasets.items())
    kind = "task folders" if len(datasets) > 1 else "task folder"
    notes = []
    if numbers["own_task_accuracy"] is None:
        notes.append(
            f"No data task is named like one of the model's task vectors ({', '.join(vectors)}), so the separation "
            "number is the nearest-centroid accuracy (see routing.json)."
        )
    else:
        own = numbers["own_task_accuracy"]
        notes.append(
            f"Own task's vector largest (weights averaged over the blocks): {own['all_blocks']:.1%} of "
            f"{own['num_samples']} images of the data tasks the model names (chance {1 / len(vectors):.0%})."
        )
    if numbers["nearest_centroid_accuracy"] is not None:
        notes.append(f"Nearest-centroid separation of the data tasks: {numbers['nearest_centroid_accuracy']:.1%}.")
    if args.max_samples is not None:
        notes.append(f"At most {args.max_samples} images per class of each data task.")
    return RoutingReport(
        model=args.model,
        model_type=config.model_type,
        data=args.data,
        data_description=f"{len(datasets)} {kind} ({sizes} images)",
        num_samples=len(data_tasks),
        numbers=numbers,
        figures=routing_figures(numbers, Path(args.model).name or args.model),
        notes=notes,
    )

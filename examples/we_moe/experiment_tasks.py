"""WEMoE's claim on a CPU-sized problem: merging per-task fine-tunes of one CLIP into a weight-ensembling MoE whose
routers are adapted at test time beats the static merges (average, task arithmetic, TIES) and AdaMerging.

Per seed, on the four download-free tasks of `hf_moe.task_data` (digits, photos, shapes, patterns):

1. pretrained: a small CLIP (`hf_moe.toy`, whole-word tokens) trained contrastively, briefly, with the Trainer
   (the CLIP-MoE demo's recipe) on captions "{template}" x "{class name}" of a few TRAIN images of every task,
   so that it is above chance but mediocre on each; its logit scale is then set to the 100 it was trained with;
2. individual: the pretrained model fine-tuned separately on each task's train split, VISION TOWER ONLY (as the
   tanganke checkpoints): cross-entropy of exp(logit_scale) * cos(image, zero-shot head) with the frozen text
   tower's head (the task's class names and templates), Adam;
3. merges of the four fine-tuned vision towers: average, task arithmetic (lambda 0.3), TIES (lambda 0.3,
   density 0.2), AdaMerging (layer-wise, coefficients entropy-trained on the unlabeled TEST images of every task),
   WEMoE (`merge_wemoe`, router depth 2, init lambda 0.3) before and after test-time adaptation of its routers,
   E-WEMoE (shared router, task vectors pruned 90 %) before and after test-time adaptation.

Reported: zero-shot accuracy on each task's test split (the task's templates and class names) and the average over
tasks; each individual fine-tune on its own task. TTA and AdaMerging use `hf_moe.we_moe.tta.TTATrainer` (one
shuffled unlabeled batch of every task per step, sum of the mean entropies), with CPU-sized settings below (the
paper: 1000 steps at lr 1e-4). A JSON with the per-seed numbers, the mean (+- std) and the markdown table goes to
--output.

    python examples/we_moe/experiment_tasks.py --output examples/we_moe/experiment_tasks_results.json
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPModel, HfArgumentParser


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_moe.clip_moe.demo import train_contrastive  # noqa: E402  (example script: the CLIP-MoE demo's recipe)
from hf_moe.conversion import merge_wemoe  # noqa: E402
from hf_moe.evaluation import zero_shot_classification  # noqa: E402
from hf_moe.experiments import experiment_workspace, format_mean_std, mean_std
from hf_moe.fileio import atomic_output_file  # noqa: E402
from hf_moe.merging import load_for_merge, merge_clip_vision, task_vectors  # noqa: E402
from hf_moe.task_data import TASK_NAMES, build_tasks  # noqa: E402
from hf_moe.toy import save_toy_clip  # noqa: E402
from hf_moe.we_moe.adamerging import AdaMergingCLIP  # noqa: E402
from hf_moe.we_moe.demo import caption_words, finetune_vision_tower  # noqa: E402
from hf_moe.we_moe.demo import test_time_adapt as adapt  # noqa: E402
from hf_moe.we_moe.tta import zero_shot_heads  # noqa: E402


METHODS = {
    "pretrained": "pretrained",
    "individual": "individual fine-tunes (each on its task)",
    "average": "simple average",
    "task_arithmetic": "task arithmetic (λ 0.3)",
    "ties": "TIES (λ 0.3, density 0.2)",
    "adamerging": "AdaMerging (layer-wise, TTA)",
    "wemoe": "WEMoE (depth-2 routers), no TTA",
    "wemoe_tta": "WEMoE + TTA",
    "ewemoe": "E-WEMoE (shared router, prune 0.9), no TTA",
    "ewemoe_tta": "E-WEMoE + TTA",
}
LOGIT_SCALE = 100.0


@dataclass
class ExperimentArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One full run per seed."})
    output: str = field(default="experiment_tasks.json", metadata={"help": "JSON file for the results."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Keep the models here (a new or empty folder); default: a temporary one."}
    )
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES), metadata={"help": "Tasks (>= 2)."})
    train_per_class: int = field(default=64, metadata={"help": "Train images per class of every task."})
    test_per_class: int = field(default=50, metadata={"help": "Test images per class of every task."})
    hidden_size: int = field(default=64, metadata={"help": "Width of both towers of the small CLIP."})
    num_layers: int = field(default=2, metadata={"help": "Layers of each tower."})
    pretrain_per_class: int = field(
        default=8, metadata={"help": "Pretraining: the first N train images per class of every task, captioned."}
    )
    pretrain_steps: int = field(default=300, metadata={"help": "Contrastive pretraining steps."})
    pretrain_batch_size: int = field(default=32, metadata={"help": "Pretraining batch size."})
    pretrain_learning_rate: float = field(default=3e-3, metadata={"help": "Pretraining peak lr (cosine)."})
    finetune_steps: int = field(default=600, metadata={"help": "Fine-tuning steps per task (vision tower only)."})
    finetune_batch_size: int = field(default=32, metadata={"help": "Fine-tuning batch size."})
    finetune_learning_rate: float = field(default=1e-3, metadata={"help": "Fine-tuning Adam lr (constant)."})
    tta_steps: int = field(default=200, metadata={"help": "WEMoE / E-WEMoE / AdaMerging test-time steps."})
    tta_batch_size: int = field(default=16, metadata={"help": "Unlabeled test images per task per TTA step."})
    tta_learning_rate: float = field(default=1e-2, metadata={"help": "Router Adam lr (cosine over the steps)."})
    adamerging_learning_rate: float = field(default=1e-2, metadata={"help": "AdaMerging coefficients' Adam lr."})

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("Give at least one seed.")
        if len(set(self.tasks)) < 2:
            raise ValueError("Merging needs at least two distinct tasks.")
        if not 1 <= self.pretrain_per_class <= self.train_per_class:
            raise ValueError("pretrain_per_class must be between 1 and train_per_class.")


# ------------------------------------------------------------------------------------------------------- helpers


def save_caption_folder(tasks, output_dir: Path, per_class: int, seed: int) -> Path:
    """An image folder (`metadata.jsonl`: file_name, text) of the first `per_class` train images per class of every
    task, each captioned by one of its task's templates drawn at random."""
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for task in tasks.values():
        seen = {}
        for image, label in zip(task.images("train"), task.labels("train")):
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > per_class:
                continue
            template = task.templates[int(torch.randint(len(task.templates), (1,), generator=generator))]
            file_name = f"{len(rows):05d}.png"
            image.save(output_dir / file_name)
            rows.append({"file_name": file_name, "text": template.format(task.class_names[label])})
    (output_dir / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return output_dir


def task_heads(model, processor, tasks) -> dict[str, torch.Tensor]:
    names = {name: task.class_names for name, task in tasks.items()}
    return zero_shot_heads(model, processor, names, {name: task.templates for name, task in tasks.items()})


def evaluate(model, processor, tasks) -> dict[str, float]:
    """Zero-shot top-1 accuracy on each task's test split (its templates and class names), routed per sample."""
    return {
        name: zero_shot_classification(
            model,
            processor,
            task.dataset("test"),
            templates=list(task.templates),
            class_names=task.class_names,
            progress=False,
        )["top1_accuracy"]
        for name, task in tasks.items()
    }


def finetune_vision(pretrained_dir: Path, task, output_dir: Path, args: ExperimentArguments, seed: int) -> Path:
    """Fine-tune the vision tower only, by cross-entropy against the frozen zero-shot head of `task`."""
    return finetune_vision_tower(
        pretrained_dir,
        task,
        output_dir,
        args.finetune_steps,
        args.finetune_batch_size,
        args.finetune_learning_rate,
        seed,
    )


def test_time_adapt(model, processor, tasks, output_dir: Path, trainable: list[str], lr: float, args, seed: int):
    """Entropy TTA with `TTATrainer` on the unlabeled TEST images of every task (only `trainable` train)."""
    return adapt(model, processor, tasks, output_dir, trainable, lr, args.tta_steps, args.tta_batch_size, seed)


@torch.no_grad()
def mean_routing_weights(model, processor, tasks) -> dict[str, list[list[float]]]:
    """{task: per WEMoE layer, the routing weights (one per task vector) averaged over the task's test images}."""
    mean = {}
    for name, task in tasks.items():
        pixel_values = processor.image_processor(images=task.images("test"), return_tensors="pt")["pixel_values"]
        outputs = model.vision_model(pixel_values=pixel_values, output_routing_weights=True)
        mean[name] = [[round(v, 3) for v in weights.mean(0).tolist()] for weights in outputs.routing_weights]
    return mean


# ------------------------------------------------------------------------------------------------------- one seed


def run_seed(args: ExperimentArguments, seed: int, root: Path) -> dict[str, dict[str, float]]:
    tasks = build_tasks(args.tasks, train_per_class=args.train_per_class, test_per_class=args.test_per_class, seed=seed)
    init_dir, pretrained_dir = root / "init", root / "pretrained"
    save_toy_clip(
        init_dir, seed=seed, words=caption_words(tasks), hidden_size=args.hidden_size, num_layers=args.num_layers
    )
    train_contrastive(
        init_dir,
        save_caption_folder(tasks, root / "captions", args.pretrain_per_class, seed),
        pretrained_dir,
        [".*"],
        max_steps=args.pretrain_steps,
        per_device_train_batch_size=args.pretrain_batch_size,
        learning_rate=args.pretrain_learning_rate,
        seed=seed,
    )
    # The recipe trains with a fixed logit scale of 100 (the model's own stays at CLIP's init): store it.
    model = CLIPModel.from_pretrained(pretrained_dir)
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    model.save_pretrained(pretrained_dir)
    processor = AutoProcessor.from_pretrained(pretrained_dir)

    results, routing = {}, {}

    def report(method, scores):
        scores = {**scores, "average": sum(scores.values()) / len(scores)}
        results[method] = scores
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        print(f"   seed {seed} {METHODS[method]}: {shown}", flush=True)

    report("pretrained", evaluate(model, processor, tasks))
    finetuned, individual = [], {}
    for name, task in tasks.items():
        folder = finetune_vision(pretrained_dir, task, root / f"finetuned_{name}", args, seed)
        finetuned.append(folder)
        individual.update(evaluate(CLIPModel.from_pretrained(folder), processor, {name: task}))
    report("individual", individual)

    for method, options in (("average", {}), ("task_arithmetic", {"scaling": 0.3}), ("ties", {"scaling": 0.3})):
        merged = merge_clip_vision(method, pretrained_dir, finetuned, root / method, **options)
        report(method, evaluate(merged, processor, tasks))

    base, base_state, finetuned_states = load_for_merge(pretrained_dir, finetuned)
    wrapper = AdaMergingCLIP(base, task_vectors(base_state, finetuned_states), init_lambda=0.3)
    test_time_adapt(
        wrapper, processor, tasks, root / "adamerging", [r"^merge_coefficients$"], args.adamerging_learning_rate,
        args, seed,
    )  # fmt: skip
    report("adamerging", evaluate(wrapper.merged_model(), processor, tasks))

    for method, options in (("wemoe", {}), ("ewemoe", {"shared_router": True, "prune_ratio": 0.9})):
        model = merge_wemoe(
            pretrained_dir, finetuned, root / method, router_depth=2, task_names=list(tasks), seed=seed, **options
        )
        report(method, evaluate(model, processor, tasks))
        lr = args.tta_learning_rate
        test_time_adapt(model, processor, tasks, root / f"{method}_tta", [r"router"], lr, args, seed)
        report(f"{method}_tta", evaluate(model, processor, tasks))
        routing[f"{method}_tta"] = mean_routing_weights(model, processor, tasks)
    return results, routing


# ------------------------------------------------------------------------------------------------------- summary


def summarize(per_seed: dict[int, dict], columns: list[str]) -> dict:
    summary = {}
    for method in METHODS:
        summary[method] = {}
        for column in columns:
            summary[method][column] = mean_std([runs[method][column] for runs in per_seed.values()])
    return summary


def markdown_table(summary: dict, columns: list[str]) -> str:
    rows = ["| method | " + " | ".join(columns) + " |", "| --- | " + " | ".join("---" for _ in columns) + " |"]
    for method, name in METHODS.items():
        rows.append(
            f"| {name} | "
            + " | ".join(format_mean_std(summary[method][column], scale=100, digits=1) for column in columns)
            + " |"
        )
    return "\n".join(rows)


def run_experiment(args: ExperimentArguments) -> dict:
    started = time.perf_counter()
    with experiment_workspace(args.work_dir, prefix="experiment_tasks_") as work_dir:
        per_seed, routing = {}, {}
        for seed in args.seeds:
            print(f"Seed {seed}", flush=True)
            per_seed[seed], routing[str(seed)] = run_seed(args, seed, work_dir / f"seed{seed}")
    columns = [*args.tasks, "average"]
    summary = summarize(per_seed, columns)
    result = {
        "settings": {key: value for key, value in asdict(args).items() if key not in ("output", "work_dir")},
        "methods": METHODS,
        "chance": {name: 1 / len(task.class_names) for name, task in build_tasks(args.tasks, train_per_class=1,
                                                                                   test_per_class=1).items()},
        "per_seed": {str(seed): runs for seed, runs in per_seed.items()},
        "summary": summary,
        # After TTA, per seed, method and task: each layer's routing weights (tasks in --tasks order), averaged
        # over the task's test images: does a task's images route to its own task vector?
        "mean_routing_weights": routing,
        "table": markdown_table(summary, columns),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    with atomic_output_file(args.output) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ExperimentArguments).parse_args_into_dataclasses(argv)
    result = run_experiment(args)
    print(json.dumps({key: result[key] for key in ("summary", "runtime_seconds")}, indent=2))
    print(result["table"])
    print(f"Results written to {args.output}")
    return result


if __name__ == "__main__":
    main()

"""MoDE's claim on a CPU-sized problem: data experts trained on caption clusters and ensembled per task, against ONE
model trained from the same seed on all the data for as many steps as all the experts together.

Per seed, on captioned real images shipped in PyPI packages (scikit-learn's handwritten digits with described
captions, "a heavy narrow seven"; crops of its two sample photos; generated shapes and stripe patterns, the latter
three captioned with their task's templates, `hf_moe.task_data`):

1. seed: a small CLIP (`hf_moe.toy`) trained on ALL the pairs (MoDE's experts branch off one such seed);
2. for N in --num_experts: `hf-moe mode cluster` (captions embedded by the seed's own text tower, "clip" pooling;
   fine balanced k-means, fine centers grouped into N experts), `hf-moe mode train-expert` for each expert (the
   whole seed trained --expert_steps on its clusters' pairs plus 2% of the others), `hf-moe mode build`;
3. all-data: the seed trained on all the pairs for N x --expert_steps, with the same recipe (`train-expert` with
   other share 1: every pair), so both sides spend the same training compute.

Reported: zero-shot top-1 accuracy on held-out images of every task (the 297 digits never captioned; photo crops
from the part of each photo not cropped for training; freshly generated shapes and patterns), per task and averaged:
the seed, each expert, the best single expert (chosen by its test average: an oracle), expert-max (the best expert per
task, the report's oracle), the uniform ensemble, the task-adaptive ensemble (weights from the class names, the
released formula) and the all-data model. Also which task's pairs each expert got. The JSON (per-seed numbers, mean
+- std, markdown table) goes to --output.

    python examples/mode/experiment.py --output examples/mode/experiment_results.json
"""

import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPModel, HfArgumentParser


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_moe.conversion import build_mode  # noqa: E402
from hf_moe.evaluation import zero_shot_classification  # noqa: E402
from hf_moe.experiments import experiment_workspace, format_mean_std, mean_std
from hf_moe.fileio import atomic_output_file  # noqa: E402
from hf_moe.mode.data import read_assignments  # noqa: E402
from hf_moe.mode.demo import cluster_captions, train_data_expert, train_seed  # noqa: E402
from hf_moe.mode.report import evaluate_task  # noqa: E402
from hf_moe.task_data import TASK_TEMPLATES, build_tasks  # noqa: E402
from hf_moe.toy import save_toy_clip  # noqa: E402
from hf_moe.toy_data import (  # noqa: E402
    DESCRIBED_TEMPLATES,
    DIGIT_NAMES,
    NUM_DIGITS,
    describe_digit,
    described_digit_words,
    digit_classification_dataset,
    digit_images_at,
)
from hf_moe.training import JOB_FILE  # noqa: E402


TASKS = ("digits", "photos", "shapes", "patterns")
OTHER_TASKS = TASKS[1:]  # from hf_moe.task_data; the digits come from hf_moe.toy_data's described captions
HELD_OUT_DIGITS = range(1500, NUM_DIGITS)


@dataclass
class ExperimentArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One full run per seed."})
    num_experts: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "MoDE sizes N to build."})
    output: str = field(default="experiment_results.json", metadata={"help": "JSON file for the results."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Keep the models here (a new or empty folder); default: a temporary one."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny sizes (seconds; for the test): overrides the sizes."})
    train_digits: int = field(default=1200, metadata={"help": "Captioned training digits (the first ones)."})
    train_per_class: int = field(default=75, metadata={"help": "Training images per class of photos/shapes/patterns."})
    test_per_class: int = field(default=50, metadata={"help": "Test images per class of photos/shapes/patterns."})
    hidden_size: int = field(default=64, metadata={"help": "Width of both towers of the small CLIP."})
    num_fine_clusters: int = field(default=32, metadata={"help": "Fine clusters m."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size (seed, experts, all-data)."})
    seed_steps: int = field(default=600, metadata={"help": "Seed training steps on all pairs."})
    seed_learning_rate: float = field(default=3e-3, metadata={"help": "Seed peak lr (cosine)."})
    expert_steps: int = field(default=100, metadata={"help": "Steps per expert (all-data: N x this)."})
    expert_learning_rate: float = field(default=5e-4, metadata={"help": "Expert / all-data peak lr (cosine)."})
    other_share: float = field(default=0.02, metadata={"help": "Share of the other experts' pairs (paper: 0.02)."})

    def __post_init__(self):
        if self.quick:
            self.train_digits, self.train_per_class, self.test_per_class = 120, 8, 6
            self.hidden_size, self.num_fine_clusters, self.seed_steps, self.expert_steps = 32, 6, 6, 3
        if not self.seeds or not self.num_experts:
            raise ValueError("Give at least one seed and one expert count.")
        if not 1 <= self.train_digits <= HELD_OUT_DIGITS.start:
            raise ValueError(f"train_digits must be in [1, {HELD_OUT_DIGITS.start}] (the rest are held out).")
        if any(n < 1 or n > self.num_fine_clusters for n in self.num_experts):
            raise ValueError("Each expert count must be in [1, num_fine_clusters].")


# ------------------------------------------------------------------------------------------------------- data


def task_words(tasks) -> list[str]:
    """Whole-word tokens of the small CLIP: every word of the captions and prompts."""
    texts = [*described_digit_words(), *TASK_TEMPLATES["digits"], *DIGIT_NAMES]
    texts += [text for task in tasks.values() for text in (*task.templates, *task.class_names)]
    return sorted({word for text in texts for word in re.findall(r"[A-Za-z0-9]+", text)})


def save_pairs(tasks, output_dir: Path, train_digits: int, seed: int) -> Path:
    """One image folder of every training pair, each file named after its task (`{task}-{i}.png`: the pair key of
    `hf-moe mode cluster` tells the task): the described digits, and the other tasks' train images captioned by one
    of their templates drawn at random."""
    output_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int) -> int:
        return int(torch.randint(count, (1,), generator=generator))

    pairs = [(image, describe_digit(index, draw(len(DESCRIBED_TEMPLATES))), "digits")
             for index, image in zip(range(train_digits), digit_images_at(range(train_digits)))]  # fmt: skip
    for name, task in tasks.items():
        for image, label in zip(task.images("train"), task.labels("train")):
            pairs.append((image, task.templates[draw(len(task.templates))].format(task.class_names[label]), name))
    rows = []
    for position, (image, text, task) in enumerate(pairs):
        file_name = f"{task}-{position:05d}.png"
        image.save(output_dir / file_name)
        rows.append(json.dumps({"file_name": file_name, "text": text}) + "\n")
    (output_dir / "metadata.jsonl").write_text("".join(rows))
    return output_dir


def test_sets(tasks) -> dict[str, tuple]:
    """{task: (dataset, class names, templates)} of the held-out images."""
    sets = {"digits": (digit_classification_dataset(HELD_OUT_DIGITS), DIGIT_NAMES, list(TASK_TEMPLATES["digits"]))}
    for name, task in tasks.items():
        sets[name] = (task.dataset("test"), task.class_names, list(task.templates))
    return sets


def expert_tasks(clusters_dir: Path, num_experts: int) -> list[dict[str, int]]:
    """Per expert, how many of its own pairs (its clusters') come from each task."""
    table = read_assignments(clusters_dir, ("key", "coarse")).to_pydict()
    counts = [Counter() for _ in range(num_experts)]
    for key, coarse in zip(table["key"], table["coarse"]):
        counts[coarse][Path(key).name.split("-")[0]] += 1
    return [{task: counter[task] for task in TASKS} for counter in counts]


def trained_steps(model_dir: Path) -> int:
    return json.loads((model_dir / JOB_FILE).read_text())["global_step"]


# ------------------------------------------------------------------------------------------------------- one seed


def with_average(scores: dict[str, float]) -> dict[str, float]:
    return {**scores, "average": sum(scores.values()) / len(scores)}


def clip_accuracies(model_dir: Path, sets) -> dict[str, float]:
    model, processor = CLIPModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    return with_average(
        {
            name: zero_shot_classification(model, processor, data, templates, names, progress=False)["top1_accuracy"]
            for name, (data, names, templates) in sets.items()
        }
    )


def run_mode(args, n: int, seed: int, root: Path, data_dir: Path, seed_dir: Path, sets) -> dict:
    """MoDE with n experts vs the all-data model of the same total steps."""
    clusters = cluster_captions(data_dir, seed_dir, root / "clusters", n, args.num_fine_clusters, seed)
    training = dict(
        per_device_train_batch_size=args.batch_size, learning_rate=args.expert_learning_rate, weight_decay=0.1,
        seed=seed,
    )  # fmt: skip
    experts = [
        train_data_expert(
            seed_dir,
            data_dir,
            clusters,
            k,
            root / f"expert-{k}",
            args.other_share,
            max_steps=args.expert_steps,
            **training,
        )  # fmt: skip
        for k in range(n)
    ]
    model = build_mode(experts, clusters, root / "mode")
    processor = AutoProcessor.from_pretrained(root / "mode")
    reports = {
        name: evaluate_task(model, processor, data, names, templates, name=name, progress=False)
        for name, (data, names, templates) in sets.items()
    }

    def column(key):
        return with_average({name: report.row[key] for name, report in reports.items()})

    scores = {f"expert_{k}": column(f"expert-{k}") for k in range(n)}
    best = max(range(n), key=lambda k: scores[f"expert_{k}"]["average"])
    scores["best_expert"] = scores[f"expert_{best}"]
    scores.update(expert_max=column("expert-max"), all_unit=column("all_unit"), ensemble=column("ensemble"))
    # Every pair (other share 1) with the experts' recipe: the same trainer, schedule shape and learning rate.
    all_data = train_data_expert(
        seed_dir, data_dir, clusters, 0, root / "all-data", 1.0, max_steps=n * args.expert_steps, **training
    )
    scores["all_data"] = clip_accuracies(all_data, sets)
    return {
        "scores": scores,
        "best_expert_index": best,
        "task_weights": {name: report.task_weights.tolist() for name, report in reports.items()},
        "expert_pairs_by_task": expert_tasks(clusters, n),
        "steps": {"experts": [trained_steps(e) for e in experts], "all_data": trained_steps(all_data)},
    }


def run_seed(args: ExperimentArguments, seed: int, root: Path) -> dict:
    tasks = build_tasks(
        OTHER_TASKS, train_per_class=args.train_per_class, test_per_class=args.test_per_class, seed=seed
    )
    init_dir, seed_dir = root / "init", root / "seed"
    save_toy_clip(init_dir, seed=seed, words=task_words(tasks), hidden_size=args.hidden_size)
    data_dir = save_pairs(tasks, root / "pairs", args.train_digits, seed)
    train_seed(
        init_dir, data_dir, seed_dir, max_steps=args.seed_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.seed_learning_rate, weight_decay=0.1, seed=seed,
    )  # fmt: skip
    sets = test_sets(tasks)
    result = {"seed": clip_accuracies(seed_dir, sets)}
    print(f"  seed {seed}: seed CLIP average {result['seed']['average']:.3f}", flush=True)
    for n in args.num_experts:
        result[f"mode_{n}"] = run_mode(args, n, seed, root / f"mode-{n}", data_dir, seed_dir, sets)
        scores = result[f"mode_{n}"]["scores"]
        print(
            f"  seed {seed}, {n} experts: ensemble {scores['ensemble']['average']:.3f}, uniform "
            f"{scores['all_unit']['average']:.3f}, best expert {scores['best_expert']['average']:.3f}, all-data "
            f"{scores['all_data']['average']:.3f}",
            flush=True,
        )
    return result


# ------------------------------------------------------------------------------------------------------- summary


def method_rows(args: ExperimentArguments) -> dict[str, str]:
    """{row id: its name in the table}; a row id is `seed` or `mode_{n}/{score}`."""
    rows = {"seed": f"seed CLIP ({args.seed_steps} steps, all pairs)"}
    for n in args.num_experts:
        steps = f"{n} x {args.expert_steps} steps"
        rows.update({f"mode_{n}/expert_{k}": f"MoDE-{n} expert {k}" for k in range(n)})
        rows[f"mode_{n}/best_expert"] = f"MoDE-{n} best single expert (oracle pick)"
        rows[f"mode_{n}/expert_max"] = f"MoDE-{n} expert-max (best per task, oracle)"
        rows[f"mode_{n}/all_unit"] = f"MoDE-{n} uniform ensemble"
        rows[f"mode_{n}/ensemble"] = f"MoDE-{n} task-adaptive ensemble ({steps})"
        rows[f"mode_{n}/all_data"] = f"all-data CLIP from the seed ({steps})"
    return rows


def row_scores(run: dict, row: str) -> dict[str, float]:
    if row == "seed":
        return run["seed"]
    mode, score = row.split("/")
    return run[mode]["scores"][score]


def summarize(per_seed: dict, rows: dict[str, str]) -> dict:
    summary = {}
    for row in rows:
        summary[row] = {}
        for column in (*TASKS, "average"):
            summary[row][column] = mean_std([row_scores(run, row)[column] for run in per_seed.values()])
    return summary


def markdown_table(summary: dict, rows: dict[str, str]) -> str:
    columns = [*TASKS, "average"]
    lines = ["| method | " + " | ".join(columns) + " |", "| --- | " + " | ".join("---" for _ in columns) + " |"]
    for row, name in rows.items():
        lines.append(
            f"| {name} | "
            + " | ".join(format_mean_std(summary[row][column], scale=100, digits=1) for column in columns)
            + " |"
        )
    return "\n".join(lines)


def run_experiment(args: ExperimentArguments) -> dict:
    started = time.perf_counter()
    with experiment_workspace(args.work_dir, prefix="mode_experiment_") as work_dir:
        per_seed = {}
        for seed in args.seeds:
            print(f"Seed {seed}", flush=True)
            per_seed[str(seed)] = run_seed(args, seed, work_dir / f"seed{seed}")
    rows = method_rows(args)
    summary = summarize(per_seed, rows)
    sets = build_tasks(OTHER_TASKS, train_per_class=1, test_per_class=1)
    result = {
        "settings": {key: value for key, value in asdict(args).items() if key not in ("output", "work_dir")},
        "methods": rows,
        "chance": {"digits": 1 / len(DIGIT_NAMES), **{name: 1 / len(task.class_names) for name, task in sets.items()}},
        "per_seed": per_seed,
        "summary": summary,
        "table": markdown_table(summary, rows),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_output_file(args.output) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ExperimentArguments).parse_args_into_dataclasses(argv)
    result = run_experiment(args)
    print(result["table"])
    print(f"{result['runtime_seconds']:.0f} s; results written to {args.output}")
    return result


if __name__ == "__main__":
    main()

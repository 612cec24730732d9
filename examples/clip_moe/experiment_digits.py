"""CLIP-MoE's claim on a CPU-sized problem: from one trained dense CLIP, does MCL multiplet upcycling + router
training beat the dense model, the dense model trained further with the same compute, and sparse upcycling?

Per seed: a small CLIP (the demo's: hidden 32, 2 layers per tower, whole-word tokens) is trained contrastively on
1500 of scikit-learn's digits with generated captions ("a heavy narrow seven"). From that base, each arm gets the
same extra training, `(num_experts - 1) * stage_steps + router_steps` steps of `batch_size` pairs on the same data:

    dense                     the base, no extra training
    dense + more training     every weight, all extra steps
    sparse upcycling + router every expert a copy of the base MLP; routers only (the official code's
                              `--init upcycling`): mixing identical experts computes the dense function
    sparse upcycling + all    the same MoE, every weight trained (sparse upcycling as Komatsuzaki et al.)
    MCL + router (CLIP-MoE)   `num_experts - 1` MCL stages of `stage_steps` (MLPs only, cluster-homogeneous
                              batches), the multiplet MoE, then `router_steps` of router training

Reported on the 297 held-out digits: zero-shot accuracy (prompt "a handwritten digit {}") and retrieval R@1 in
both directions over the held-out images with distinct captions (one image per (digit, ink, width) caption, so
every query has one right answer). Mean +- sample std over the seeds; a JSON with the per-seed numbers and the
markdown table goes to --output.

    python examples/clip_moe/experiment_digits.py --output examples/clip_moe/experiment_digits_results.json

Equal steps are not equal FLOPs: an MoE step runs top_k expert MLPs per token, and MCL also extracts features of
the training set once per stage (forward passes only).
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModel, AutoProcessor, HfArgumentParser

from hf_moe.clip_moe.demo import (
    HELD_OUT_DIGITS,
    DigitEvaluation,
    run_digit_mcl,
    train_contrastive,
    train_digit_router,
)
from hf_moe.conversion import upcycle_clip
from hf_moe.experiments import experiment_workspace, format_mean_std, mean_std
from hf_moe.fileio import atomic_output_file
from hf_moe.toy import save_toy_clip
from hf_moe.toy_data import described_digit_words, save_described_digit_folder


METHODS = {
    "dense": "dense base",
    "dense_more": "dense + more training (all weights)",
    "sparse_router": "sparse upcycling + router training",
    "sparse_all": "sparse upcycling + all weights trained",
    "mcl_router": "MCL multiplet + router training (CLIP-MoE)",
}
METRICS = {"zero_shot_accuracy": "zero-shot acc.", "image_to_text_R@1": "R@1 I->T", "text_to_image_R@1": "R@1 T->I"}


@dataclass
class ExperimentArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One full run per seed."})
    output: str = field(default="experiment_digits.json", metadata={"help": "JSON file for the results."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Keep the models here (a new or empty folder); default: a temporary one."}
    )
    train_images: int = field(default=1500, metadata={"help": "Training digits: the first N (at most 1500)."})
    pretrain_steps: int = field(default=1000, metadata={"help": "Steps of the dense base's training."})
    pretrain_batch_size: int = field(default=64, metadata={"help": "Batch size of the dense base's training."})
    pretrain_learning_rate: float = field(default=3e-3, metadata={"help": "Peak lr of the dense base's training."})
    num_experts: int = field(default=3, metadata={"help": "Experts per MoE block (MCL: num_experts - 1 stages)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    image_clusters: int = field(default=2, metadata={"help": "MCL k-means clusters of image features per stage."})
    text_clusters: int = field(default=2, metadata={"help": "MCL k-means clusters of text features per stage."})
    stage_steps: int = field(default=150, metadata={"help": "Steps of each MCL stage."})
    router_steps: int = field(default=150, metadata={"help": "Steps of MCL's router training."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of every extra-training arm."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak lr of the extra training of weights (dense, experts, MCL stages)."}
    )
    router_learning_rate: float = field(default=1e-2, metadata={"help": "Peak lr when only the routers train."})

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("Give at least one seed.")
        if not 1 <= self.train_images <= HELD_OUT_DIGITS.start:
            raise ValueError(f"train_images must be between 1 and {HELD_OUT_DIGITS.start} (the rest is held out).")

    @property
    def extra_steps(self) -> int:
        return (self.num_experts - 1) * self.stage_steps + self.router_steps


def run_seed(args: ExperimentArguments, seed: int, root: Path, evaluate: DigitEvaluation) -> dict[str, dict]:
    data_dir, init_dir, base_dir = root / "captions", root / "init", root / "base"
    save_described_digit_folder(data_dir, range(args.train_images), seed=seed)
    save_toy_clip(init_dir, seed=seed, words=described_digit_words())
    common = dict(seed=seed)
    train_contrastive(
        init_dir,
        data_dir,
        base_dir,
        [".*"],
        max_steps=args.pretrain_steps,
        per_device_train_batch_size=args.pretrain_batch_size,
        learning_rate=args.pretrain_learning_rate,
        **common,
    )
    extra = dict(max_steps=args.extra_steps, per_device_train_batch_size=args.batch_size, **common)
    moe = dict(num_experts=args.num_experts, top_k=args.top_k, seed=seed)
    folders = {"dense": base_dir}

    folders["dense_more"] = train_contrastive(
        base_dir, data_dir, root / "dense_more", [".*"], learning_rate=args.learning_rate, **extra
    )
    upcycled = root / "sparse_upcycled"
    upcycle_clip(base_dir, upcycled, **moe)
    folders["sparse_router"] = train_digit_router(
        upcycled, data_dir, root / "sparse_router", learning_rate=args.router_learning_rate, **extra
    )
    folders["sparse_all"] = train_contrastive(
        upcycled, data_dir, root / "sparse_all", [".*"], learning_rate=args.learning_rate, **extra
    )
    mcl_moe = run_digit_mcl(
        base_dir,
        data_dir,
        root / "mcl",
        dict(
            num_experts=args.num_experts,
            top_k=args.top_k,
            image_clusters=args.image_clusters,
            text_clusters=args.text_clusters,
        ),
        max_steps=args.stage_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        **common,
    )
    folders["mcl_router"] = train_digit_router(
        mcl_moe,
        data_dir,
        root / "mcl_router",
        max_steps=args.router_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.router_learning_rate,
        **common,
    )
    results = {}
    for method, folder in folders.items():
        scores = evaluate(AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder))
        results[method] = {metric: scores[metric] for metric in METRICS}
        print(f"   seed {seed} {METHODS[method]}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[method].items()))
    return results


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    summary = {}
    for method in METHODS:
        summary[method] = {}
        for metric in METRICS:
            summary[method][metric] = mean_std([runs[method][metric] for runs in per_seed.values()])
    return summary


def markdown_table(summary: dict, args: ExperimentArguments) -> str:
    extra = f"{args.extra_steps} x {args.batch_size}"
    rows = [
        "| model | extra training (steps x batch) | " + " | ".join(METRICS.values()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for method, name in METHODS.items():
        cells = [format_mean_std(summary[method][metric]) for metric in METRICS]
        rows.append(f"| {name} | {'-' if method == 'dense' else extra} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_experiment(args: ExperimentArguments) -> dict:
    started = time.perf_counter()
    with experiment_workspace(args.work_dir, prefix="experiment_digits_") as work_dir:
        evaluate = DigitEvaluation()
        per_seed = {}
        for seed in args.seeds:
            print(f"Seed {seed}")
            per_seed[seed] = run_seed(args, seed, work_dir / f"seed{seed}", evaluate)
    summary = summarize(per_seed)
    result = {
        "settings": {key: value for key, value in asdict(args).items() if key not in ("output", "work_dir")},
        "extra_training_steps": args.extra_steps,
        "num_held_out_images": len(evaluate.classification),
        "num_retrieval_pairs": len(evaluate.retrieval),
        "methods": METHODS,
        "per_seed": {str(seed): runs for seed, runs in per_seed.items()},
        "summary": summary,
        "table": markdown_table(summary, args),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }
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

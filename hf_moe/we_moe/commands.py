"""WEMoE's `hf-moe` sub-commands. Only the standard library is imported here: `hf-moe --help` reads `COMMANDS`
without importing torch or transformers; each command imports its module when it runs.

    hf-moe merge-wemoe BASE FINETUNED [FINETUNED ...] --output_dir DIR [--init_lambda 0.3 --router_depth 2
        --shared_router --prune_ratio 0.9 --svd_rank_fraction F --task_names NAME ... --moe_layers I ...]
        [--dtype auto|float32|bfloat16|float16] [--max_shard_size 5GB]
    hf-moe wemoe-params --model MODEL     (or MODEL alone)

The generic `hf-moe merge` of dense CLIP fine-tunes (the WEMoE paper's baselines) is a shared command
(`hf_moe.merging.merge_command`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..arguments import HubArguments, parse_command_line


# `--dtype` of the converters (hf_moe.checkpoint_io.DTYPE_CHOICES; not imported: it would import torch).
DTYPES = ["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = "Dtype of the written weights (default: BASE's); the merge is computed in float32 per tensor."
SHARD_HELP = "Shard the weights above this size (with an index)."


@dataclass
class MergeWEMoEArguments:
    output_dir: str = field(metadata={"help": "Folder to write the WEMoE model to (must be new or empty)."})
    init_lambda: float = field(default=0.3, metadata={"help": "Initial routing weight / task-arithmetic factor."})
    router_depth: int = field(default=2, metadata={"help": "Router depth: 0, 1 or 2 (the paper's default)."})
    shared_router: bool = field(default=False, metadata={"help": "E-WEMoE: one router shared by all blocks."})
    prune_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Store task vectors magnitude-pruned: entries above this |value| quantile kept (E-WEMoE: 0.9)."
        },
    )
    svd_rank_fraction: float | None = field(
        default=None, metadata={"help": "Store task vectors as truncated SVD keeping this share of singular values."}
    )
    task_names: list[str] | None = field(
        default=None, metadata={"help": "One name per FINETUNED (default: their folder/repo names).", "nargs": "+"}
    )
    batch_reduce: bool = field(
        default=False, metadata={"help": "One merge per batch (transductive); default: per-sample routing."}
    )
    moe_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Indices of the blocks that become WEMoE blocks (default: all); the others get the "
            "task-arithmetic MLP.",
            "nargs": "+",
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the router initialisation."})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    max_shard_size: str = field(default="5GB", metadata={"help": SHARD_HELP})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def merge_wemoe_command(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from ..conversion import merge_wemoe

    parser = HfArgumentParser(
        (MergeWEMoEArguments, HubArguments), prog="hf-moe merge-wemoe", description=merge_wemoe.__doc__.split("\n")[0]
    )
    parser.add_argument("pretrained", metavar="BASE", help="Pretrained CLIP (Hub id or folder).")
    parser.add_argument("finetuned", nargs="+", metavar="FINETUNED", help="Fine-tunes of BASE, one per task.")
    args, hub_args, positional = parse_command_line(parser, argv)
    merge_wemoe(positional.pretrained, positional.finetuned, **vars(args), hub=hub_args, return_model=False)
    print(f"Merged {len(positional.finetuned)} fine-tuned model(s) into the WEMoE model {args.output_dir}")


def wemoe_parameter_counts(model) -> dict[str, int]:
    """Parameter counts of a WEMoE model: routers (the trainable part), task vectors (pruned ones by their stored
    values, i.e. nonzeros; SVD ones by their factors), total, and the dense CLIP of the same architecture
    (total - task vectors - routers: a WEMoE keeps every dense weight under its own name)."""
    counts = {"routers": 0, "task_vectors": 0, "total": 0}
    for name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        if ".router." in f".{name}":
            counts["routers"] += parameter.numel()
        elif ".task_vectors." in name:
            counts["task_vectors"] += parameter.numel()
    counts["dense"] = counts["total"] - counts["task_vectors"] - counts["routers"]
    return counts


def wemoe_params_command(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="hf-moe wemoe-params", description="Parameter counts of a WEMoE model.")
    parser.add_argument("--model", help="WEMoE model (Hub id or folder).")
    parser.add_argument("model_path", nargs="?", metavar="MODEL", help="The same, given without --model.")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.model_path is None):
        parser.error("give the WEMoE model once: --model MODEL (or MODEL alone).")
    args.model = args.model or args.model_path
    from ..loading import load_pretrained

    model = load_pretrained(args.model)
    vision = getattr(model.config, "vision_config", model.config)
    if not hasattr(vision, "num_tasks") or not hasattr(vision, "task_vector_format"):
        raise ValueError(f"'{args.model}' is a '{model.config.model_type}' model, not a WEMoE.")
    counts = wemoe_parameter_counts(model)
    router = "one shared router (E-WEMoE)" if vision.shared_router else "a router per block"
    storage = {"dense": "dense", "pruned": f"pruned {vision.prune_ratio:.0%}", "svd": "SVD"}[vision.task_vector_format]
    print(
        f"{args.model}: {type(model).__name__}, {vision.num_tasks} tasks, depth-{vision.router_depth} routers "
        f"({router}), {storage} task vectors"
    )
    dense = counts["dense"]
    rows = [
        ("trainable (routers)", counts["routers"]),
        ("task vectors (stored)", counts["task_vectors"]),
        ("total", counts["total"]),
        ("one dense model", dense),
    ]
    print(f"{'':<24}{'parameters':>14}{'vs one dense model':>22}")
    for label, value in rows:
        print(f"{label:<24}{value:>14,}{value / dense:>21.2%}")


def tta_wemoe_command(argv: list[str]) -> None:
    from .tta import main as tta_main

    output_dir = tta_main(argv)
    print(f"The test-time-adapted model is in {output_dir}")


def adamerging_command(argv: list[str]) -> None:
    from .adamerging import main as adamerging_main

    output_dir = adamerging_main(argv)
    print(f"The AdaMerging model is in {output_dir}")


def demo(output_dir: str) -> None:
    """WEMoE's part of `hf-moe demo` (writes OUTPUT_DIR/wemoe)."""
    from pathlib import Path

    from .demo import run

    run(Path(output_dir) / "wemoe")


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "tta-wemoe": (tta_wemoe_command, "Adapt a WEMoE's routers on unlabeled task images (entropy minimisation)."),
    "merge-wemoe": (merge_wemoe_command, "Merge a pretrained CLIP and fine-tunes of it into a WEMoE / E-WEMoE model."),
    "wemoe-params": (wemoe_params_command, "Trainable (router) and total parameters of a WEMoE vs one dense model."),
    "adamerging": (
        adamerging_command,
        "Layer-wise AdaMerging: merge coefficients trained by entropy on unlabeled data.",
    ),
}

"""MoDE's `hf-moe` sub-commands, under one `hf-moe mode` command. Only the standard library is imported here:
`hf-moe --help` reads `COMMANDS` without importing torch or transformers; each sub-command imports its module
(which defines `main(argv)`) when it runs.

    hf-moe mode embed --data SHARDS --output_dir EMB [--encoder princeton-nlp/sup-simcse-bert-base-uncased]
    hf-moe mode cluster --data SHARDS --num_experts N --output_dir DIR [--num_fine_clusters 1024]
    hf-moe mode train-expert --base CLIP --data DATA --clusters DIR --expert K --output_dir OUT
        [--other_share 0.02] [TrainingArguments flags]
    hf-moe mode build EXPERT [EXPERT ...] --clusters DIR --output_dir OUT
    hf-moe mode report --model OUT --tasks TASK_DIR [TASK_DIR ...] [--output report.csv]
"""

import importlib
from collections.abc import Callable


# sub-command -> (module under hf_moe.mode defining main(argv), help)
SUBCOMMANDS = {
    "embed": ("embed", "Embed the captions of image-text shards with a text encoder (SimCSE by default)."),
    "cluster": ("cluster", "Fine + coarse balanced k-means of the caption embeddings; assign every pair."),
    "train-expert": ("train_expert", "Train one data expert (CLIP) on its clusters, from the seed model."),
    "build": ("build", "Build one MoDEModel from the trained experts and the clusters."),
    "report": ("report", "Per-expert, uniform and task-adaptive ensemble zero-shot accuracy as a CSV."),
}


def mode_usage() -> str:
    rows = "\n".join(f"  {name:<16}{help_text}" for name, (_, help_text) in SUBCOMMANDS.items())
    return f"usage: hf-moe mode SUBCOMMAND [options]   (hf-moe mode SUBCOMMAND --help)\n\n{rows}"


def mode_command(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(mode_usage())
        return
    if argv[0] not in SUBCOMMANDS:
        raise SystemExit(f"hf-moe mode: unknown sub-command {argv[0]!r}\n\n{mode_usage()}")
    module = importlib.import_module(f"{__package__}.{SUBCOMMANDS[argv[0]][0]}")
    module.main(argv[1:])


def demo(output_dir: str) -> None:
    """MoDE's part of `hf-moe demo` (writes OUTPUT_DIR/mode)."""
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(output_dir) / "mode")


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "mode": (mode_command, "MoDE data experts: mode embed|cluster|train-expert|build|report (hf-moe mode --help)."),
}

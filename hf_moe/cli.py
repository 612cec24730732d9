"""The `hf-moe` command: one table of sub-commands, to which each family contributes its own.

Every sub-command parses its options with `HfArgumentParser`, so `--num_experts` and `--num-experts` both work,
as in transformers' examples. Only the standard library is imported until a command runs.

    hf-moe eval zero-shot --model MODEL --data CLASS_FOLDERS [--class_names imagenet|cifar10|cifar100|FILE]
        [--templates auto|default|imagenet|FILE] [--output FILE]
    hf-moe eval retrieval --model MODEL --data CAPTIONED_FOLDER [--output FILE]
    hf-moe prepare coco|flickr30k --annotations FILE --images DIR --output_dir DIR
    hf-moe COMMAND --help     (the family commands: see `hf-moe --help`)
"""

import logging as pylogging
import sys
from collections.abc import Callable

from .clip_moe import commands as clip_moe_commands
from .mode import commands as mode_commands
from .moiie import commands as moiie_commands
from .we_moe import commands as we_moe_commands


def eval_command(argv: list[str]) -> None:
    from .evaluation import evaluate_command

    evaluate_command(argv)


# Each family's demo, in the order `hf-moe demo` runs them: (name, function of the output folder).
FAMILY_DEMOS = {
    "clip_moe": clip_moe_commands.demo,
    "we_moe": we_moe_commands.demo,
    "moiie": moiie_commands.demo,
    "mode": mode_commands.demo,
}


def demo_command(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="hf-moe demo",
        description="Every family's demo, offline on a CPU: CLIP-MoE (train a small CLIP on digits, upcycle it, MCL, "
        "router training, reload without hf_moe), WEMoE (fine-tune, merge, route per sample, reload), MoIIE "
        "(upcycle a small SigLIP + Phi-3, stage 1 and 2 training on digit questions, answer via the pipeline, reload) "
        "and MoDE (cluster captions, train 2 data experts, build one model, classify via the pipeline).",
    )
    parser.add_argument("--output_dir", "--output-dir", default="outputs/demo", help="Where the demos write.")
    parser.add_argument("--family", choices=["all", *FAMILY_DEMOS], default="all", help="Run one family's demo.")
    args = parser.parse_args(argv)
    for name, demo in FAMILY_DEMOS.items():
        if args.family in ("all", name):
            demo(args.output_dir)


def prepare_command(argv: list[str]) -> None:
    from .prepare import main as prepare_main

    prepare_main(argv)


SHARED_COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "eval": (eval_command, "Zero-shot classification or image-text retrieval evaluation (eval zero-shot|retrieval)."),
    "prepare": (prepare_command, "Turn official COCO / Flickr30k annotations into captioned image folders."),
    "demo": (demo_command, "Every family's demo on built-in data (CLIP-MoE, WEMoE, MoIIE, MoDE), offline, on a CPU."),
}

# (family, its commands): the order of `hf-moe --help`.
FAMILIES = [
    ("shared", SHARED_COMMANDS),
    ("CLIP-MoE", clip_moe_commands.COMMANDS),
    ("WEMoE", we_moe_commands.COMMANDS),
    ("MoIIE", moiie_commands.COMMANDS),
    ("MoDE", mode_commands.COMMANDS),
]
COMMANDS = {name: entry for _, commands in FAMILIES for name, entry in commands.items()}


def usage() -> str:
    sections = []
    for family, commands in FAMILIES:
        if not commands:
            continue
        rows = "\n".join(f"  {name:<28}{help_text}" for name, (_, help_text) in commands.items())
        sections.append(f"{family}:\n{rows}")
    return "usage: hf-moe COMMAND [options]   (hf-moe COMMAND --help for its options)\n\n" + "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hf-moe: unknown command '{argv[0]}'\n", file=sys.stderr)
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    # hf-moe's own progress messages (its loggers live outside the `transformers` logger tree).
    pylogging.basicConfig(format="[hf-moe] %(message)s")
    pylogging.getLogger("hf_moe").setLevel(pylogging.INFO)
    try:
        COMMANDS[argv[0]][0](argv[1:])
    except (ValueError, OSError) as err:  # bad input: a clear one-paragraph error instead of a traceback
        print(f"hf-moe {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

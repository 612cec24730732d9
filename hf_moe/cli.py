"""The `hf-moe` command: one table of sub-commands, to which each family contributes its own.

Every sub-command parses its options with `HfArgumentParser`, so `--num_experts` and `--num-experts` both work,
as in transformers' examples. Only the standard library is imported until a command runs.

    hf-moe eval zero-shot --model MODEL --data CLASS_FOLDERS [--class_names imagenet|cifar10|cifar100|FILE]
        [--templates auto|default|imagenet|FILE] [--output FILE]
    hf-moe eval retrieval --model MODEL --data CAPTIONED_FOLDER [--output FILE]
    hf-moe prepare coco|flickr30k --annotations FILE --images DIR --output_dir DIR
    hf-moe merge --method METHOD BASE FINETUNED [FINETUNED ...] --output_dir DIR [the method's options]
    hf-moe COMMAND --help     (the family commands: see `hf-moe --help`)
    hf-moe COMMAND OPTIONS.yaml [--flag value ...]   (options from a JSON / YAML file; flags win)
    hf-moe --version

`hf-moe COMMAND --help` prints the help cached in `hf_moe/cli_help.py` (the training commands' options include
`TrainingArguments`', whose import takes torch and several seconds); `python -m hf_moe.cli --update-help-cache`
regenerates it, and tests/test_reliability_cli.py fails when it is stale. The cache is used only under the
transformers version it was generated with; under another, the help is built as the command would build it.
"""

import contextlib
import io
import logging as pylogging
import os
import sys
from collections.abc import Callable
from pathlib import Path

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


def merge_command(argv: list[str]) -> None:
    from .merging import merge_command as run_merge

    run_merge(argv)


def prepare_command(argv: list[str]) -> None:
    from .prepare import main as prepare_main

    prepare_main(argv)


# hf-moe family (hf_moe.loading.HF_MOE_MODEL_TYPES' values) -> its package, whose `routing.analyze_routing` runs
# `hf-moe analyze-routing` on that family's models.
ROUTING_FAMILIES = {"CLIP-MoE": "clip_moe", "WEMoE": "we_moe", "MoIIE": "moiie", "MoDE": "mode"}


def routing_module(model_type: str | None, model: str = ""):
    """The `hf_moe.<family>.routing` module that analyses a `model_type` model; a ValueError naming the model_type
    and the families for a dense or unknown one."""
    import importlib

    from .loading import HF_MOE_MODEL_TYPES

    family = HF_MOE_MODEL_TYPES.get(model_type)
    if family not in ROUTING_FAMILIES:
        families = ", ".join(
            f"{name} ({', '.join(t for t, f in HF_MOE_MODEL_TYPES.items() if f == name)})" for name in ROUTING_FAMILIES
        )
        raise ValueError(
            f"'{model}' is a '{model_type}' model, which has no routing to analyse: hf-moe analyze-routing takes an "
            f"hf-moe MoE model of one of the families {families}."
        )
    return importlib.import_module(f"hf_moe.{ROUTING_FAMILIES[family]}.routing")


def analyze_routing_command(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from .arguments import parse_command_line
    from .routing_report import RoutingArguments, check_matplotlib, check_routing_output_dir, write_routing_report

    parser = HfArgumentParser(
        RoutingArguments,
        prog="hf-moe analyze-routing",
        description="Which experts a model uses, for which inputs: runs an hf-moe MoE model (CLIP-MoE, WEMoE, MoIIE, "
        "MoDE) on DATA and writes OUTPUT_DIR/routing.json (every plotted number), PNG figures and routing.md (a "
        "short report embedding them). Works on CPU and GPU (--device).",
    )
    (args,) = parse_command_line(parser, argv)
    check_matplotlib()  # before any model is loaded
    check_routing_output_dir(args)
    from .loading import load_config

    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    module = routing_module(getattr(config, "model_type", None), args.model)
    report = module.analyze_routing(args)
    output_dir = write_routing_report(report, args.output_dir, overwrite=args.overwrite_output_dir)
    print(
        f"Wrote the routing analysis of {args.model} to {output_dir} (routing.md, routing.json, "
        f"{len(report.figures)} figures)"
    )


SHARED_COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "eval": (eval_command, "Zero-shot classification or image-text retrieval evaluation (eval zero-shot|retrieval)."),
    "prepare": (prepare_command, "Turn official COCO / Flickr30k annotations into captioned image folders."),
    "merge": (
        merge_command,
        "Merge fine-tuned CLIP vision towers (average, task_arithmetic, ties, dare_linear, dare_ties) into one model.",
    ),
    "analyze-routing": (
        analyze_routing_command,
        "Which experts a MoE model uses for which inputs: routing.json, figures and routing.md (every family).",
    ),
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


def version() -> str:
    """`hf-moe --version`: hf-moe's version and the versions of the libraries a bug report needs (read from the
    installed packages' metadata, without importing them)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    from . import __version__

    libraries = []
    for name in ("transformers", "torch", "huggingface_hub", "accelerate"):
        try:
            libraries.append(f"{name} {installed_version(name)}")
        except PackageNotFoundError:
            continue
    return f"hf-moe {__version__} ({', '.join(libraries)}; Python {sys.version.split()[0]})"


# Sub-commands one level below `eval` and `prepare` (their modules import torch, so they are named here).
EVAL_TASKS = ("zero-shot", "retrieval", "suite")
PREPARE_DATASETS = ("coco", "flickr30k")
HELP_CACHE = Path(__file__).with_name("cli_help.py")
HELP_WIDTH = 100


def help_command_paths() -> list[str]:
    """Every `hf-moe ...` command line whose `--help` is cached: each command, and each sub-command of `eval`,
    `prepare` and `mode`."""
    paths = []
    for name in COMMANDS:
        paths.append(name)
        subcommands = {"eval": EVAL_TASKS, "prepare": PREPARE_DATASETS, "mode": tuple(mode_commands.SUBCOMMANDS)}
        paths += [f"{name} {sub}" for sub in subcommands.get(name, ())]
    return paths


def build_help(path: str) -> str:
    """The `--help` text of `hf-moe PATH` as the command itself prints it (importing what it imports), at a
    fixed width so the cache does not depend on the terminal."""
    name, *rest = path.split()
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            COMMANDS[name][0]([*rest, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue()


def _literal(text: str) -> str:
    """A Python string literal of `text` quoted as ruff format quotes it (double quotes unless single ones need fewer
    escapes), so the generated file is format-clean and checked byte for byte."""
    quote = "'" if text.count('"') > text.count("'") else '"'
    body = text.replace("\\", "\\\\").replace(quote, "\\" + quote)
    body = body.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return quote + body + quote


def help_cache_source() -> str:
    """The source of `hf_moe/cli_help.py`: every command's `--help`, and the transformers version it holds for."""
    from importlib.metadata import version as installed_version

    lines = [
        "# ruff: noqa: E501",
        '"""The `--help` of every hf-moe command; generated by `python -m hf_moe.cli --update-help-cache`.',
        "",
        "Do not edit: `hf-moe COMMAND --help` prints it without importing torch, and tests/test_reliability_cli.py",
        "checks it is current.",
        '"""',
        "",
        f"TRANSFORMERS_VERSION = {_literal(installed_version('transformers'))}",
        "",
        "HELP = {",
    ]
    for path in help_command_paths():
        lines.append(f"    {_literal(path)}: (")
        lines += [f"        {_literal(line)}" for line in build_help(path).splitlines(keepends=True)]
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def cached_help(argv: list[str]) -> str | None:
    """The cached `--help` of the command line `argv` when it asks for help, else None."""
    if not any(arg in ("-h", "--help") for arg in argv[1:]):
        return None
    try:
        from importlib.metadata import version as installed_version

        from .cli_help import HELP, TRANSFORMERS_VERSION

        if installed_version("transformers") != TRANSFORMERS_VERSION:
            return None  # another transformers: its TrainingArguments may differ; let the command build the help
    except Exception:  # no cache (or transformers missing): the command builds its help itself
        return None
    paths = [f"{argv[0]} {argv[1]}"] if len(argv) > 1 else []  # `mode train-expert`, `eval zero-shot`, ...
    if argv[0] == "eval" and any(arg == "--suite" or arg.startswith("--suite=") for arg in argv):
        paths.insert(0, "eval suite")  # `hf-moe eval --suite X --help` is `hf-moe eval suite`'s help
    for path in [*paths, argv[0]]:
        if path in HELP:
            return HELP[path]
    return None


def usage() -> str:
    sections = []
    for family, commands in FAMILIES:
        if not commands:
            continue
        rows = "\n".join(f"  {name:<28}{help_text}" for name, (_, help_text) in commands.items())
        sections.append(f"{family}:\n{rows}")
    head = (
        "usage: hf-moe COMMAND [options]          (hf-moe COMMAND --help for its options)\n"
        "       hf-moe COMMAND OPTIONS.yaml [...]  (options from a JSON or YAML file; flags after it win)\n"
        "       hf-moe --version"
    )
    return head + "\n\n" + "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hf-moe: unknown command '{argv[0]}'\n", file=sys.stderr)
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    help_text = cached_help(argv)
    if help_text is not None:
        print(help_text, end="")
        return 0
    # hf-moe's own progress messages (its loggers live outside the `transformers` logger tree).
    pylogging.basicConfig(format="[hf-moe] %(message)s")
    pylogging.getLogger("hf_moe").setLevel(pylogging.INFO)
    if not {"-h", "--help"} & set(argv):
        from .log_noise import quiet_library_noise

        quiet_library_noise(argv[1:])
    from .fileio import output_dirs_held  # a command locks the output folder it checks until it returns

    try:
        with output_dirs_held():
            COMMANDS[argv[0]][0](argv[1:])
    except (ValueError, OSError) as err:  # bad input: a clear one-paragraph error instead of a traceback
        print(f"hf-moe {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-help-cache"]:
        HELP_CACHE.write_text(help_cache_source(), encoding="utf-8")
        print(f"Wrote {HELP_CACHE}")
        sys.exit(0)
    sys.exit(main())

"""Command-line argument groups shared by every family's `hf-moe` commands (standard library only, so that
`hf-moe --help` stays free of torch and transformers), and `parse_command_line`, the one parse every command uses."""

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


def check_license(license: str | None, option: str = "--license") -> str | None:
    """`license` if the Hub's model-card `license` field takes it, else a ValueError naming `option` and the value.

    huggingface_hub ships no list of the Hub's license ids, so this checks their form: one lowercase token without
    spaces (`apache-2.0`, `mit`, `cc-by-4.0`, `llama3.1`, `other`), which every id of the Hub's list is."""
    if license is None:
        return None
    if not isinstance(license, str) or not license or any(char.isspace() for char in license):
        raise ValueError(
            f"{option} {license!r} is not a license the Hub takes: give one license id without spaces as the Hub "
            "lists them (https://huggingface.co/docs/hub/repositories-licenses), e.g. apache-2.0, mit, cc-by-4.0, "
            "or 'other' for a license the list lacks."
        )
    if license != license.lower():
        raise ValueError(
            f"{option} {license!r} is not a license the Hub takes: its license ids are lowercase "
            f"(did you mean {license.lower()!r}?)."
        )
    return license


@dataclass
class CardArguments:
    """The model-card option of every command that writes a model: `--license` overrides the license the card
    inherits from the base model(s)."""

    license: str | None = field(
        default=None,
        metadata={
            "help": "The card's license (a Hub license id such as apache-2.0 or mit, or 'other'; default: the "
            "base model's, where its card states one)."
        },
    )

    def __post_init__(self):
        # Refused when the command starts, not after the model is built or trained.
        self.license = check_license(self.license)
        # Cooperative: as a mixin of `TrainingArguments`, whose own checks run next.
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class HubArguments(CardArguments):
    """The Hub options of commands that write a model (the names and meanings of `TrainingArguments`'), and
    `--license`."""

    push_to_hub: bool = field(default=False, metadata={"help": "Upload the written folder to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repo to push to (NAMESPACE/NAME; default: the output folder's name)."}
    )
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "Create the repo private (default: the organisation's default)."}
    )


# An options file given as a command's first argument, as in transformers' example scripts (`train.py args.json`).
OPTIONS_FILE_SUFFIXES = (".json", ".yaml", ".yml")
# The flags that name the model a command reads, the same in every command: they lead the usage and help lines even
# where a field keeps an older name (`--seed_model`, `--pretrained`, `--llm` stay accepted as aliases).
MODEL_FLAGS = ("--model", "--base")


def is_options_file(arg: str) -> bool:
    return not arg.startswith("-") and arg.lower().endswith(OPTIONS_FILE_SUFFIXES)


def read_options_file(path: str | Path) -> dict:
    """The `{option: value}` mapping of a JSON or YAML options file; a clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Options file '{path}' does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml  # a dependency of transformers, imported only when an options file is given

            values = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError
        raise ValueError(f"Options file '{path}' is not valid JSON: {err}") from err
    except Exception as err:  # yaml.YAMLError
        if type(err).__module__.split(".")[0] != "yaml":
            raise
        raise ValueError(f"Options file '{path}' is not valid YAML: {' '.join(str(err).split())}") from err
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"Options file '{path}' must hold a mapping of option names to values (as `--help` lists them), "
            f"not a {type(values).__name__}."
        )
    return values


def _option_value(action: argparse.Action, key: str, value, path: Path):
    """`value` of option `key` from the file, converted and checked as the same value on the command line would be
    (argparse converts only string defaults, and never checks `choices` of defaults)."""
    if value is None:
        return None

    def convert(item):
        if isinstance(item, str) and callable(action.type):
            try:
                item = action.type(item)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"Options file '{path}': invalid value {item!r} for '{key}' ({err}).") from err
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(str(choice) for choice in action.choices)
            raise ValueError(f"Options file '{path}': invalid value {item!r} for '{key}' (choose from {choices}).")
        return item

    if action.nargs in ("+", "*"):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if action.nargs == "+" and not items:
            raise ValueError(f"Options file '{path}': '{key}' needs at least one value.")
        return [convert(item) for item in items]
    if isinstance(value, (list, dict)):  # a dict option such as `lr_scheduler_kwargs` takes its value as it is
        return value
    return convert(value)


def apply_options_file(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Make the options of the JSON / YAML file `path` the defaults of `parser`, so that flags given on the command
    line still win. Keys are option names without `--` (the field name, an alias, or dashes for underscores);
    an unknown key is refused, naming it and the file, before anything runs."""
    path = Path(path)
    values = read_options_file(path)
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    positionals = {action.dest for action in parser._actions if not action.option_strings}
    defaults, given_as = {}, {}
    for key, value in values.items():
        key = str(key)
        action = by_flag.get(f"--{key.lstrip('-')}") or by_flag.get(f"--{key.lstrip('-').replace('-', '_')}")
        if action is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            if key in positionals:
                raise ValueError(
                    f"Options file '{path}': '{key}' is a positional argument of {parser.prog}; give it on the "
                    "command line after the file."
                )
            known = sorted({flag.lstrip("-") for flag in by_flag if flag.startswith("--") and flag != "--help"})
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" ({parser.prog} --help lists the options)"
            raise ValueError(f"Options file '{path}': unknown option '{key}'{hint}.")
        if action.dest in given_as:
            raise ValueError(
                f"Options file '{path}': '{key}' and '{given_as[action.dest]}' set the same option; keep one."
            )
        given_as[action.dest] = key
        if isinstance(action, argparse._StoreConstAction):  # `no_clamp: true` means the flag `--no_clamp` is given
            if value:
                defaults[action.dest] = action.const
            continue
        defaults[action.dest] = _option_value(action, key, value, path)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False  # given by the file; argparse checks `required` even when a default is set
    parser.set_defaults(**defaults)


def lead_with_model_flags(parser: argparse.ArgumentParser) -> None:
    """Show `--model` / `--base` first (usage line and help) where a field keeps an older name as its own."""
    for action in parser._actions:
        for flag in MODEL_FLAGS:
            if flag in action.option_strings[1:]:
                action.option_strings.remove(flag)
                action.option_strings.insert(0, flag)
                if action.metavar is None:
                    action.metavar = flag.lstrip("-").upper()


def parse_command_line(parser, argv: list[str] | None = None) -> tuple:
    """`parser.parse_args_into_dataclasses(argv)` (an `HfArgumentParser`) for every hf-moe command, where the options
    may also come from a JSON or YAML file given as the first argument (`hf-moe train-router args.yaml`), as in
    transformers' example scripts; flags after the file win over its values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    lead_with_model_flags(parser)
    parser.epilog = (
        "The options may also come from a JSON or YAML file given first (keys: the option names without '--'); "
        "flags after the file win."
    )
    if argv and is_options_file(argv[0]) and not any(arg in ("-h", "--help") for arg in argv):
        apply_options_file(parser, argv[0])
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(argv)

"""One source of defaults: every `hf-moe` command's options are its function's parameters, with the same names and
defaults, so the two cannot drift apart (issue 16: `merge-wemoe` lacked `moe_layers`, `upcycle-clip` the per-tower
`moe_layers`, `eval retrieval` the `k_values` its function takes).

Each command's parser is caught as it parses (`argparse.ArgumentParser.parse_known_args` patched), so what is
compared is the parser the command really builds, with every option, alias and positional it adds.

Two kinds of command:
- a function of keyword options (the converters, `eval`, `prepare`, `merge`, `mode build`, `mode report`): its CLI
  options and its parameters must have the same names and defaults, up to the differences listed here with why;
- a function of the options dataclasses themselves (the training commands): each parameter is annotated with the
  dataclass (or a parent of it) the parser is built from, so there is one declaration by construction.
"""

import argparse
import dataclasses
import importlib
import inspect
import typing
from unittest import mock

import pytest

from hf_moe import cli


REQUIRED = "<required>"


@dataclasses.dataclass
class KeywordFunction:
    """A command whose function takes its options as keyword arguments."""

    function: str  # "module:function"
    # CLI option -> the function parameter it is given as (where the names differ, e.g. an older CLI name).
    renamed: dict = dataclasses.field(default_factory=dict)
    # Options the command uses itself and does not pass on, with why.
    cli_only: dict = dataclasses.field(default_factory=dict)
    # Parameters the command sets itself (or that make no sense on a command line), with why.
    function_only: dict = dataclasses.field(default_factory=dict)
    # "module:callable" returning {option: default} of the options passed on through the function's **kwargs.
    var_keyword: str | None = None
    # Options whose default differs on purpose, with why.
    differing: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataclassFunction:
    """A command whose function takes the options dataclasses its parser is built from."""

    function: str


@dataclasses.dataclass
class NoFunction:
    """A command that dispatches or prints, and passes no option on to a function of options."""

    why: str


RETURN_MODEL = {"return_model": "the command never loads the written model back (a real one need not fit in memory)"}
EVAL_CLI_ONLY = {
    "output": "the command writes the results JSON there",
    "dtype": "the command loads the model in it",
    "trust_remote_code": "the command loads the model with it",
}
EVAL_FUNCTION_ONLY = {"processor": "the command loads it from --model", "progress": "a command shows its progress"}
ZERO_SHOT_FUNCTION_ONLY = {**EVAL_FUNCTION_ONLY, "return_predictions": "the results JSON holds the metrics"}


def clip_moe_fields() -> dict:
    """The `CLIPMoEConfig` fields `upcycle-clip` passes on through `upcycle_clip(**moe_kwargs)`, with their
    defaults (the config's: `MoEConfigFields`); `moe_layers` goes per tower."""
    from hf_moe.modeling.moe import MoEConfigFields

    return {
        "expert_dropout": MoEConfigFields.expert_dropout,
        "router_aux_loss_coef": MoEConfigFields.router_aux_loss_coef,
        "text_moe_layers": MoEConfigFields.moe_layers,
        "vision_moe_layers": MoEConfigFields.moe_layers,
    }


def merge_method_options() -> dict:
    """The merge methods' options `hf-moe merge` passes on through `merge_clip_vision(**options)`: default None,
    which leaves each method its own default."""
    from hf_moe.merging import merge_option_fields

    return {name: None for name, *_ in merge_option_fields()}


SPECS = {
    "eval": NoFunction("dispatches to `eval zero-shot` / `eval retrieval`"),
    "eval zero-shot": KeywordFunction(
        "hf_moe.evaluation:zero_shot_classification",
        cli_only={**EVAL_CLI_ONLY, "task": "the command reads that task's class_names and templates from MODEL"},
        function_only=ZERO_SHOT_FUNCTION_ONLY,
    ),
    "eval retrieval": KeywordFunction(
        "hf_moe.evaluation:image_text_retrieval", cli_only=EVAL_CLI_ONLY, function_only=EVAL_FUNCTION_ONLY
    ),
    "eval suite": DataclassFunction("hf_moe.eval_suites:run_suite"),
    "prepare": NoFunction("dispatches to `prepare coco` / `prepare flickr30k`"),
    "prepare coco": KeywordFunction(
        "hf_moe.prepare:prepare_captioned_folder", function_only={"dataset": "the sub-command: coco"}
    ),
    "prepare flickr30k": KeywordFunction(
        "hf_moe.prepare:prepare_captioned_folder", function_only={"dataset": "the sub-command: flickr30k"}
    ),
    "merge": KeywordFunction(
        "hf_moe.merging:merge_clip_vision", function_only=RETURN_MODEL, var_keyword=f"{__name__}:merge_method_options"
    ),
    "analyze-routing": NoFunction(
        "dispatches by the model's model_type to its family's analyze_routing(args), which takes the whole "
        "RoutingArguments the CLI parses"
    ),
    "demo": NoFunction("runs each family's demo(output_dir); --family picks one"),
    "upcycle-clip": KeywordFunction(
        "hf_moe.conversion:upcycle_clip", function_only=RETURN_MODEL, var_keyword=f"{__name__}:clip_moe_fields"
    ),
    "convert-clip-moe-original": KeywordFunction(
        "hf_moe.conversion:convert_clip_moe_original", function_only=RETURN_MODEL
    ),
    "mcl": DataclassFunction("hf_moe.clip_moe.mcl:run_mcl"),
    "train-router": DataclassFunction("hf_moe.clip_moe.train_router:train_router"),
    "tta-wemoe": DataclassFunction("hf_moe.we_moe.tta:tta_wemoe"),
    "merge-wemoe": KeywordFunction("hf_moe.conversion:merge_wemoe", function_only=RETURN_MODEL),
    "wemoe-params": NoFunction("prints the parameter counts of --model (wemoe_parameter_counts(model))"),
    "adamerging": DataclassFunction("hf_moe.we_moe.adamerging:adamerging"),
    "upcycle-moiie": KeywordFunction(
        "hf_moe.conversion:upcycle_moiie",
        renamed={"base": "llm"},
        function_only=RETURN_MODEL,
        differing={"vision": "a positional argument of the function (None: BASE is a dense LLaVA folder); an option"},
    ),
    "train-moiie": DataclassFunction("hf_moe.moiie.train:train_moiie"),
    "mode": NoFunction("dispatches to the MoDE sub-commands"),
    "mode embed": DataclassFunction("hf_moe.mode.embed:embed_captions"),
    "mode cluster": DataclassFunction("hf_moe.mode.cluster:cluster_pairs"),
    "mode train-expert": DataclassFunction("hf_moe.mode.train_expert:train_expert"),
    "mode build": KeywordFunction("hf_moe.conversion:build_mode", function_only=RETURN_MODEL),
    "mode report": KeywordFunction(
        # One call per task: --tasks / --task_names give each call's `data` / `name`.
        "hf_moe.mode.report:evaluate_task",
        renamed={"tasks": "data", "task_names": "name"},
        cli_only={"output": "the command writes the report CSV there"},
        function_only={"processor": "the command loads it from --model", "progress": "a command shows its progress"},
    ),
}


class _Caught(Exception):
    def __init__(self, parser):
        self.parser = parser


def command_parser(path: str) -> argparse.ArgumentParser | None:
    """The parser `hf-moe PATH` builds, caught when it starts parsing (None: the command parses nothing)."""
    name, *rest = path.split()

    def catch(parser, *args, **kwargs):
        raise _Caught(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch):
        try:
            cli.COMMANDS[name][0](rest)
        except _Caught as caught:
            return caught.parser
    return None


def cli_options(parser: argparse.ArgumentParser) -> dict:
    """{option (its dest): default, or REQUIRED} of every option and positional of `parser`."""
    options = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        required = action.required or (not action.option_strings and action.nargs not in ("?", "*"))
        # `--no_x` (store_false) shares the dest of `--x`: the first action holds the default.
        options.setdefault(action.dest, REQUIRED if required else action.default)
    return options


def options_class(annotation) -> type | None:
    """The dataclass an annotation names (`HubArguments`, `HubArguments | None`), else None."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def dataclass_defaults(cls) -> dict:
    defaults = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = REQUIRED
    return defaults


def function_parameters(function) -> tuple[dict, bool]:
    """({parameter: default, or REQUIRED}, whether it takes **kwargs); a parameter that takes an options dataclass
    (`hub: HubArguments | None`) stands for that dataclass's fields."""
    parameters, var_keyword = {}, False
    try:
        hints = typing.get_type_hints(function)
    except NameError:  # an annotation naming a class imported for type checkers only
        hints = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind is not parameter.VAR_POSITIONAL:
            group = options_class(hints.get(parameter.name))
            if group is not None:
                parameters.update(dataclass_defaults(group))
                continue
            empty = parameter.default is parameter.empty
            parameters[parameter.name] = REQUIRED if empty else parameter.default
    return parameters, var_keyword


def resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def comparable(value):
    return list(value) if isinstance(value, tuple) else value


def test_every_command_is_checked():
    assert sorted(SPECS) == sorted(cli.help_command_paths())


@pytest.fixture(scope="module")
def parsers():
    return {path: command_parser(path) for path, spec in SPECS.items() if not isinstance(spec, NoFunction)}


@pytest.mark.parametrize("path", [path for path, spec in SPECS.items() if isinstance(spec, KeywordFunction)])
def test_options_are_the_functions_parameters_with_its_defaults(path, parsers):
    spec = SPECS[path]
    parser = parsers[path]
    assert parser is not None, f"hf-moe {path} parsed nothing"
    options = {spec.renamed.get(name, name): default for name, default in cli_options(parser).items()}
    parameters, takes_kwargs = function_parameters(resolve(spec.function))
    passed_on = resolve(spec.var_keyword)() if spec.var_keyword else {}
    assert takes_kwargs == bool(spec.var_keyword), f"{spec.function}: **kwargs and the spec disagree"
    for name in (*spec.cli_only, *spec.renamed.values()):
        assert name in options, f"hf-moe {path}: the spec names '{name}', which it does not take"
    for name in spec.function_only:
        assert name in parameters, f"{spec.function}: the spec names '{name}', which it does not take"

    compared = {name: default for name, default in options.items() if name not in spec.cli_only}
    expected = {name: default for name, default in parameters.items() if name not in spec.function_only}
    expected.update(passed_on)
    assert sorted(compared) == sorted(expected), (
        f"hf-moe {path} lacks {sorted(set(expected) - set(compared))} of {spec.function} and has "
        f"{sorted(set(compared) - set(expected))} it does not take"
    )
    differing = {
        name: (compared[name], expected[name])
        for name in compared
        if comparable(compared[name]) != comparable(expected[name]) and name not in spec.differing
    }
    assert not differing, f"hf-moe {path}: (CLI default, function default) differ: {differing}"


@pytest.mark.parametrize("path", [path for path, spec in SPECS.items() if isinstance(spec, DataclassFunction)])
def test_training_functions_take_the_dataclasses_the_cli_parses(path, parsers):
    spec = SPECS[path]
    parser = parsers[path]
    function = resolve(spec.function)
    classes = list(parser.dataclass_types)
    # The parser's options are exactly its dataclasses' fields: no option added beside them.
    fields = {field.name for cls in classes for field in dataclasses.fields(cls) if field.init}
    assert set(cli_options(parser)) == fields
    parameters = list(inspect.signature(function).parameters.values())
    assert len(parameters) == len(classes), f"{spec.function} takes {parameters}, the CLI parses {classes}"
    for parameter, cls in zip(parameters, classes):
        # `X | None` (an optional group), or a string naming a class imported lazily (adamerging's training_args).
        annotations = typing.get_args(parameter.annotation) or (parameter.annotation,)
        names = {base.__name__ for base in cls.__mro__}
        assert any(annotation in cls.__mro__ or annotation in names for annotation in annotations), (
            f"{spec.function}: parameter '{parameter.name}' is annotated {parameter.annotation}, the CLI parses "
            f"{cls.__name__}"
        )


def test_keyword_defaults_are_read_from_the_options_dataclasses():
    """Where the function and the CLI both live in hf_moe, the function's keyword defaults are the dataclass's
    (one declaration), not copies of its values."""
    from hf_moe.clip_moe.mcl import MCLArguments, extract_features, joint_cluster_labels
    from hf_moe.evaluation import RetrievalEvalArguments, image_text_retrieval, zero_shot_classification
    from hf_moe.mode.report import ReportArguments, evaluate_task
    from hf_moe.prepare import PrepareArguments, prepare_captioned_folder

    def defaults(function):
        return {name: p.default for name, p in inspect.signature(function).parameters.items()}

    # A default is evaluated once, at definition: the source shows where it is read from.
    sources = {
        zero_shot_classification: "ZeroShotEvalArguments.batch_size",
        image_text_retrieval: "RetrievalEvalArguments.max_captions_per_image",
        evaluate_task: "ReportArguments.batch_size",
        prepare_captioned_folder: "PrepareArguments.skip_missing",
        extract_features: "MCLArguments.feature_batch_size",
        joint_cluster_labels: "MCLArguments.image_clusters",
    }
    for function, reference in sources.items():
        assert reference in inspect.getsource(function), f"{function.__name__} does not read {reference}"
    assert defaults(extract_features)["shard_size"] == MCLArguments.feature_shard_size
    assert defaults(joint_cluster_labels)["text_clusters"] == MCLArguments.text_clusters
    assert defaults(image_text_retrieval)["batch_size"] == RetrievalEvalArguments.batch_size
    assert defaults(evaluate_task)["templates"] == ReportArguments.templates
    assert defaults(prepare_captioned_folder)["copy_images"] == PrepareArguments.copy_images


@pytest.mark.parametrize(
    "command, function, argv, expected",
    [
        (
            "merge-wemoe",
            "merge_wemoe",
            ["BASE", "FT", "--output_dir", "OUT", "--moe_layers", "1", "3"],
            {"moe_layers": [1, 3]},
        ),
        (
            "upcycle-clip",
            "upcycle_clip",
            ["BASE", "--output_dir", "OUT", "--num_experts", "2", "--text_moe_layers", "0", "--vision_moe_layers", "1"],
            {"text_moe_layers": [0], "vision_moe_layers": [1]},
        ),
    ],
)
def test_the_added_options_reach_the_function(command, function, argv, expected):
    """The options the CLI lacked are passed on to the converter (the converter itself is stood in for)."""
    import hf_moe.conversion

    with mock.patch.object(hf_moe.conversion, function) as converter:
        cli.COMMANDS[command][0](argv)
    kwargs = converter.call_args.kwargs
    assert {name: kwargs.get(name) for name in expected} == expected

"""The command line a user expects (issue 14, items 12, 13 and the push part of 9): `hf-moe --version`; options from
a JSON or YAML file given first, flags after it winning, unknown keys refused; `--model` / `--base` for the model a
command reads, older names kept as aliases; `--help` at once, without torch, from a cache a test keeps current; a
failed `--push_to_hub` said in one line, the folder left complete."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import transformers

import hf_moe
from hf_moe.cli import HELP_CACHE, HELP_WIDTH, build_help, cached_help, help_cache_source, help_command_paths, main
from hf_moe.cli_help import TRANSFORMERS_VERSION
from hf_moe.toy_data import save_digit_caption_folder
from hf_moe.training import JOB_FILE


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hf-moe {hf_moe.__version__} (transformers {transformers.__version__}")
    assert len(out.strip().splitlines()) == 1


# --- --help: cached, current, free of torch ---------------------------------------------------------------------


# The cache holds TrainingArguments' options as one transformers version prints them; under another version (a newer
# release than the cache was generated with) every command must build its help itself instead.
CACHE_FITS = TRANSFORMERS_VERSION == transformers.__version__


@pytest.mark.skipif(CACHE_FITS, reason="the cache was generated with this transformers")
def test_help_under_another_transformers_is_built_live(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(HELP_WIDTH))  # the width the cache is built at
    for path in help_command_paths():
        assert cached_help([*path.split(), "--help"]) is None, path
    with pytest.raises(SystemExit) as exit_info:  # argparse's own --help, as without a cache
        main(["train-router", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == build_help("train-router")


@pytest.mark.skipif(not CACHE_FITS, reason=f"the cache is for transformers {TRANSFORMERS_VERSION}: built live instead")
def test_help_cache_is_current():
    """Fails when a command's options or help changed without `python -m hf_moe.cli --update-help-cache`."""
    assert HELP_CACHE.read_text(encoding="utf-8") == help_cache_source(), (
        "hf_moe/cli_help.py is stale: run `python -m hf_moe.cli --update-help-cache`"
    )


@pytest.mark.skipif(not CACHE_FITS, reason=f"the cache is for transformers {TRANSFORMERS_VERSION}: built live instead")
def test_help_prints_the_cache_without_importing_torch():
    code = (
        "import contextlib, io, json, sys\n"
        "from hf_moe.cli import help_command_paths, main\n"
        "out = {}\n"
        "for path in help_command_paths():\n"
        "    buffer = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buffer):\n"
        "        assert main([*path.split(), '--help']) == 0, path\n"
        "    out[path] = buffer.getvalue()\n"
        "heavy = sorted(name for name in ('torch', 'transformers', 'accelerate', 'datasets') if name in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'help': out}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    from hf_moe.cli_help import HELP

    assert set(report["help"]) == set(help_command_paths())
    for path, text in report["help"].items():
        assert text == HELP[path] and text.strip(), path
    assert report["help"]["train-router"].startswith("usage: hf-moe train-router [-h] --model MODEL --data DATA")
    assert "--learning_rate" in report["help"]["train-router"]  # TrainingArguments' options are there too


def test_eval_with_suite_option_prints_the_suite_help(capsys):
    """`hf-moe eval --suite X --help` is `hf-moe eval suite --help` (the suite's options, not eval's task list)."""
    from hf_moe.cli import main
    from hf_moe.cli_help import HELP

    for argv in (["eval", "--suite", "ta8", "--help"], ["eval", "--model", "m", "--suite=ta8", "-h"]):
        assert main(argv) == 0
        assert capsys.readouterr().out == HELP["eval suite"]


# --- --model / --base -------------------------------------------------------------------------------------------

# Every command's flag for the model it trains or evaluates (--model) or the dense model it starts from (--base),
# with the older names it still accepts.
MODEL_FLAGS = {
    "train-router": ("--model", []),
    "tta-wemoe": ("--model", []),
    "train-moiie": ("--model", []),
    "eval zero-shot": ("--model", []),
    "eval retrieval": ("--model", []),
    "mode report": ("--model", []),
    "wemoe-params": ("--model", []),
    "mcl": ("--base", []),
    "convert-clip-moe-original": ("--base", []),
    "mode train-expert": ("--base", ["--seed_model", "--seed-model"]),
    "adamerging": ("--base", ["--pretrained"]),
    "upcycle-moiie": ("--base", ["--llm"]),
}


@pytest.mark.parametrize("path", sorted(MODEL_FLAGS))
def test_the_model_flag_leads_the_usage_and_the_old_names_stay(path):
    from hf_moe.cli_help import HELP

    flag, aliases = MODEL_FLAGS[path]
    text = HELP[path]
    usage = text.split("\n\n")[0]
    assert f"{flag} {flag.lstrip('-').upper()}" in usage, usage
    for alias in aliases:
        assert f"{flag} {flag.lstrip('-').upper()}, {alias} " in text or f", {alias} " in text, alias
        assert alias not in usage


class Parsed(Exception):
    def __init__(self, result):
        self.result = result


@pytest.fixture
def parsed(monkeypatch):
    """`parsed(argv)`: the options `hf-moe ARGV` parses, as dicts, without running the command."""
    original = transformers.HfArgumentParser.parse_args_into_dataclasses

    def stop_after_parse(self, *args, **kwargs):
        raise Parsed(original(self, *args, **kwargs))

    monkeypatch.setattr(transformers.HfArgumentParser, "parse_args_into_dataclasses", stop_after_parse)

    def run(argv: list[str]) -> list[dict]:
        from hf_moe.cli import COMMANDS

        with pytest.raises(Parsed) as stop:
            COMMANDS[argv[0]][0](argv[1:])
        return [
            item.to_dict()
            if hasattr(item, "to_dict")
            else dataclasses.asdict(item)
            if dataclasses.is_dataclass(item)
            else vars(item)
            for item in stop.value.result
        ]

    return run


@pytest.mark.parametrize(
    "command, old, new",
    [
        ("mode train-expert", "--seed_model", "--base"),
        ("adamerging", "--pretrained", "--base"),
        ("upcycle-moiie", "--llm", "--base"),
    ],
)
def test_old_and_new_model_flags_parse_alike(parsed, tmp_path, command, old, new):
    rest = {
        "mode train-expert": ["--data", "d", "--clusters", "c", "--expert", "0", "--output_dir", str(tmp_path / "o")],
        "adamerging": ["--finetuned", "f1", "f2", "--tasks", "t1", "t2", "--output_dir", str(tmp_path / "o")],
        "upcycle-moiie": ["--vision", "siglip", "--output_dir", str(tmp_path / "o")],
    }[command]
    assert parsed([*command.split(), old, "dense", *rest]) == parsed([*command.split(), new, "dense", *rest])


def test_wemoe_params_takes_model_as_a_flag_or_alone(upcycled_dir, capsys):
    for argv in (["wemoe-params", "--model", str(upcycled_dir)], ["wemoe-params", str(upcycled_dir)]):
        assert main(argv) == 1
        assert "not a WEMoE" in capsys.readouterr().err


# --- options files ----------------------------------------------------------------------------------------------

# Flags, and the same options as a JSON file and a YAML file (YAML reads `1e-4` as a string: converted as a flag is).
TRAINING_COMMANDS = {
    "train-router": (
        ["--model", "m", "--data", "d", "--learning_rate", "1e-4", "--max_steps", "3", "--expert_dropout", "0.2"],
        {"model": "m", "data": "d", "learning_rate": 1e-4, "max_steps": 3, "expert_dropout": 0.2},
        "model: m\ndata: d\nlearning_rate: 1e-4\nmax_steps: 3\nexpert_dropout: 0.2\n",
    ),
    "tta-wemoe": (
        ["--model", "m", "--tasks", "a", "b", "--learning_rate", "1e-3", "--max_steps", "5"],
        {"model": "m", "tasks": ["a", "b"], "learning_rate": 1e-3, "max_steps": 5},
        "model: m\ntasks: [a, b]\nlearning_rate: 1e-3\nmax_steps: 5\n",
    ),
    "adamerging": (
        ["--base", "p", "--finetuned", "f1", "f2", "--tasks", "a", "b", "--no_clamp", "--init_lambda", "0.4"],
        {"pretrained": "p", "finetuned": ["f1", "f2"], "tasks": ["a", "b"], "no_clamp": True, "init_lambda": 0.4},
        "base: p\nfinetuned:\n  - f1\n  - f2\ntasks: [a, b]\nno-clamp: true\ninit_lambda: '0.4'\n",
    ),
    "mode train-expert": (
        ["--base", "s", "--data", "d", "--clusters", "c", "--expert", "1", "--other_share", "0.05"],
        {"seed_model": "s", "data": "d", "clusters": "c", "expert": 1, "other_share": 0.05},
        "base: s\ndata: d\nclusters: c\nexpert: 1\nother_share: 0.05\n",
    ),
    "mcl": (
        ["--base", "b", "--data", "d", "--num_experts", "2", "--learning_rate", "2e-5"],
        {"base": "b", "data": "d", "num_experts": 2, "learning_rate": 2e-5},
        "base: b\ndata: d\nnum_experts: 2\nlearning_rate: 2.0e-5\n",
    ),
    "train-moiie": (
        ["--model", "m", "--data", "d.json", "--stage", "finetune", "--max_length", "64"],
        {"model": "m", "data": "d.json", "stage": "finetune", "max_length": 64},
        "model: m\ndata: d.json\nstage: finetune\nmax_length: 64\n",
    ),
}


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_a_training_command_reads_its_options_from_a_json_or_yaml_file(parsed, tmp_path, command):
    flags, as_json, as_yaml = TRAINING_COMMANDS[command]
    output = ["--output_dir", str(tmp_path / "out")]
    (tmp_path / "args.json").write_text(json.dumps({**as_json, "output_dir": str(tmp_path / "out")}))
    (tmp_path / "args.yaml").write_text(as_yaml + f"output_dir: {tmp_path / 'out'}\n")
    from_flags = parsed([*command.split(), *flags, *output])
    assert parsed([*command.split(), str(tmp_path / "args.json")]) == from_flags
    assert parsed([*command.split(), str(tmp_path / "args.yaml")]) == from_flags
    # Flags after the file win over its values.
    overridden = parsed([*command.split(), str(tmp_path / "args.yaml"), "--seed", "1234"])
    assert overridden != from_flags and any(options.get("seed") == 1234 for options in overridden)


def test_flags_after_the_file_win_and_the_job_records_the_same_options(tmp_path, capsys):
    """A real train-router run from a YAML file (one flag overriding it) records the options of the flag run."""
    from hf_moe.conversion import upcycle_clip
    from hf_moe.toy import save_toy_clip

    save_toy_clip(tmp_path / "clip", seed=0)
    upcycle_clip(tmp_path / "clip", tmp_path / "moe", num_experts=2, top_k=1, seed=0)
    data = save_digit_caption_folder(tmp_path / "captions", count=8)
    common = ["--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    common += ["--dataloader_num_workers", "0"]
    flags = ["--model", str(tmp_path / "moe"), "--data", str(data), "--max_steps", "1", "--learning_rate", "0.01"]
    assert main(["train-router", *flags, *common, "--output_dir", str(tmp_path / "from-flags")]) == 0
    (tmp_path / "args.yaml").write_text(
        f"model: {tmp_path / 'moe'}\ndata: {data}\nmax_steps: 4\nlearning_rate: 1e-2\n"
        f"output_dir: {tmp_path / 'from-file'}\n"
    )
    assert main(["train-router", str(tmp_path / "args.yaml"), "--max_steps", "1", *common]) == 0

    def recorded(folder):
        job = json.loads((tmp_path / folder / JOB_FILE).read_text())
        options = dict(job["options"])
        options.pop("output_dir", None)
        return options

    assert recorded("from-file") == recorded("from-flags")
    assert recorded("from-file")["max_steps"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"model": "m", "learning_rat": 0.1}', "unknown option 'learning_rat' (did you mean 'learning_rate'?)"),
        ('{"model": "m", "no_such_option": 1}', "unknown option 'no_such_option'"),
        ('["--model", "m"]', "must hold a mapping of option names to values"),
        ('{"model": "m", "max_steps": "many"}', "invalid value 'many' for 'max_steps'"),
        ('{"model": "m", "balance_loss_weights": "nope"}', "invalid value 'nope' for 'balance_loss_weights'"),
        ('{"model": "m", "model": "n"', "is not valid JSON"),
    ],
)
def test_a_bad_options_file_is_refused_in_one_line_before_any_work(tmp_path, capsys, content, message):
    (tmp_path / "args.json").write_text(content.replace('"m"', json.dumps(str(tmp_path / "m"))))
    assert main(["train-router", str(tmp_path / "args.json"), "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"hf-moe train-router: error: Options file '{tmp_path / 'args.json'}'")
    assert message in err
    assert not (tmp_path / "out").exists()


def test_two_names_of_one_option_in_a_file_are_refused(tmp_path, capsys):
    (tmp_path / "args.yaml").write_text("seed_model: a\nbase: b\n")
    assert main(["mode", "train-expert", str(tmp_path / "args.yaml")]) == 1
    assert "'base' and 'seed_model' set the same option" in capsys.readouterr().err


def test_a_missing_options_file_is_named(tmp_path, capsys):
    assert main(["train-router", str(tmp_path / "nope.yaml")]) == 1
    assert f"Options file '{tmp_path / 'nope.yaml'}' does not exist" in capsys.readouterr().err


# --- --push_to_hub without a network -----------------------------------------------------------------------------


def test_a_failed_push_is_one_line_and_leaves_the_folder_complete(toy_clip_dir, tmp_path, capsys):
    """Offline (tests run with HF_HUB_OFFLINE=1): the model is written, the upload fails, the user is told where the
    folder is and how to push it later; exit code 1, no traceback."""
    output = tmp_path / "clip-moe"
    argv = ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--output_dir", str(output)]
    assert main([*argv, "--push_to_hub", "--hub_model_id", "someone/clip-moe"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("hf-moe upcycle-clip: error: Upload to the Hub repo 'someone/clip-moe' failed (")
    assert f"The model is saved, complete, in '{output}'; push it later with `hf upload someone/clip-moe {output}`" in (
        line
    )
    assert {"config.json", "model.safetensors", "README.md"} <= {path.name for path in output.iterdir()}
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]


def test_an_unreachable_hub_is_one_line(tmp_path):
    """The issue's case: a real connection error (httpx's, not an OSError) from an unreachable endpoint."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code = (
        "import sys\n"
        "from hf_moe.hub import push_to_hub\n"
        "try:\n"
        f"    push_to_hub({str(tmp_path / 'model')!r}, 'someone/model', ignore_patterns=['checkpoint-*'])\n"
        "except OSError as err:\n"
        "    print(type(err).__name__, err)\n"
        "    sys.exit(1)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_token"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith("HubUploadError Upload to the Hub repo 'someone/model' failed (ConnectError: ")
    assert f"push it later with `hf upload someone/model {tmp_path / 'model'} --exclude 'checkpoint-*'`" in line

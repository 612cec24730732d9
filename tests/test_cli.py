"""The `hf-moe` command: its table, and one clear line (exit 1) instead of a traceback for bad input."""

import json
import shutil

import pytest
from PIL import Image

from hf_moe.cli import COMMANDS, main


def test_help_lists_every_command_and_unknown_commands_fail(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


@pytest.fixture
def class_folders(tmp_path):
    for label, color in (("cat", "white"), ("dog", "black")):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (16, 16), color).save(tmp_path / "data" / label / "0.png")
    return tmp_path / "data"


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_truncated_moe_weights_are_named_by_every_loading_command(upcycled_dir, class_folders, tmp_path, capsys):
    model = tmp_path / "moe"
    shutil.copytree(upcycled_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    assert main(["eval", "zero-shot", "--model", str(model), "--data", str(class_folders)]) == 1
    assert f"Model weights file '{weights}' is truncated" in error_line(capsys)
    argv = ["train-router", "--model", str(model), "--data", str(class_folders), "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 1
    assert f"Model weights file '{weights}' is truncated" in error_line(capsys)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_missing_local_model_folder_is_one_line(class_folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # so `runs/clip-moe` is a mistyped folder, not the Hub repo of a `runs` user
    for argv in (
        ["eval", "zero-shot", "--model", "runs/clip-moe", "--data", str(class_folders)],
        ["upcycle-clip", "./no-such-clip", "--num_experts", "2", "--output_dir", "out"],
        ["convert-clip-moe-original", "release.pt", "--base", "/no/such/clip", "--output_dir", "out"],
    ):
        assert main(argv) == 1, argv
        assert "does not exist" in error_line(capsys), argv
    assert not (tmp_path / "out").exists()


def test_eval_of_a_local_folder_records_its_scores_in_the_card(upcycled_dir, class_folders, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from hf_moe.hub import write_model_card

    model = tmp_path / "moe"
    shutil.copytree(upcycled_dir, model)
    write_model_card(model, base_model=None, how_built="test")
    assert main(["eval", "zero-shot", "--model", str(model), "--data", str(class_folders)]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = ModelCard.load(model / "README.md").data.eval_results
    assert {(result.task_type, result.dataset_name) for result in results} == {
        ("zero-shot-image-classification", "data")
    }
    # Both scores of a zero-shot run (top-1 and the mean per-class accuracy), as printed.
    assert {result.metric_type: result.metric_value for result in results} == {
        "top1_accuracy": printed["top1_accuracy"],
        "mean_per_class_accuracy": printed["mean_per_class_accuracy"],
    }

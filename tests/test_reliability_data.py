"""Issue 14, data folders and log noise: corrupt images of TTA task folders are skipped and counted, a task folder
without class labels is refused naming it, image paths of captioned folders stay inside them unless allowed, and a
toy `hf-moe mcl` prints what matters (no DeepSpeed notice, no "Downloading data", one bar per phase, the final
folder named)."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from hf_moe.cli import main
from hf_moe.data import load_image_text_dataset
from hf_moe.toy_data import save_digit_caption_folder, save_digit_class_folders
from hf_moe.training import JOB_FILE
from hf_moe.we_moe.tta import TTAScriptArguments, load_tasks


STAND_IN = [r"post_layernorm"]  # a dense CLIP has no router: its final vision LayerNorm stands in for one
TTA_FLAGS = ["--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
TTA_FLAGS += ["--trainable_parameters", *STAND_IN, "--templates", "default", "--max_steps", "1"]


def corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return path


@pytest.fixture(scope="module")
def task_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    good = save_digit_class_folders(root / "good", 6)
    damaged = save_digit_class_folders(root / "damaged", 6, offset=20)
    classes = sorted(p for p in damaged.iterdir() if p.is_dir())
    corrupt(classes[0] / "broken.png")
    (classes[1] / "empty.png").write_bytes(b"")
    one_class = root / "one_class"
    (one_class / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(one_class / "cat" / f"{i}.png")
    flat = root / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (0, i * 40, 0)).save(flat / f"{i}.png")
    return {"good": good, "damaged": damaged, "one_class": one_class, "flat": flat, "root": root}


# ---- item 7: TTA task folders, corrupt images skipped and counted --------------------------------------------------


def test_tta_tasks_skip_and_count_unreadable_images(task_folders, caplog):
    with caplog.at_level("WARNING"):
        datasets, names, _ = load_tasks(
            TTAScriptArguments(model="unused", tasks=[str(task_folders["good"]), str(task_folders["damaged"])])
        )
    assert len(datasets["good"]) == 6 and len(datasets["damaged"]) == 6  # 8 files, 2 unreadable
    assert "skipped 2 of 8 rows: 2 unreadable image" in caplog.text
    assert "broken.png" in caplog.text and "empty.png" in caplog.text and "'damaged'" in caplog.text
    assert "'good'" not in caplog.text  # nothing said about the clean task


def test_tta_task_whose_every_image_is_unreadable_is_refused(task_folders, tmp_path):
    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / name).mkdir(parents=True)
        corrupt(broken / name / "x.png")
    with pytest.raises(ValueError, match=r"Task 'broken': no image of .*broken can be read"):
        load_tasks(TTAScriptArguments(model="unused", tasks=[str(broken)]))


def test_tta_wemoe_runs_on_a_task_folder_with_corrupt_images(toy_clip_dir, task_folders, tmp_path, caplog):
    out = tmp_path / "out"
    tasks = [str(task_folders["good"]), str(task_folders["damaged"])]
    # A batch of every image of a task: the unreadable ones would be drawn at the first step.
    argv = ["tta-wemoe", "--model", str(toy_clip_dir), "--tasks", *tasks, "--output_dir", str(out), *TTA_FLAGS]
    with caplog.at_level("WARNING"):
        assert main([*argv, "--per_device_train_batch_size", "8"]) == 0
    assert "2 unreadable image" in caplog.text
    assert json.loads((out / JOB_FILE).read_text())["complete"] is True


# ---- item 9: a task folder without class labels ----------------------------------------------------------------


def test_tta_refuses_a_one_class_task_folder_naming_it(task_folders):
    with pytest.raises(ValueError) as error:
        load_tasks(TTAScriptArguments(model="unused", tasks=[str(task_folders["one_class"])]))
    message = str(error.value)
    assert str(task_folders["one_class"]) in message and "single class sub-folder ('cat')" in message
    assert "at least two" in message
    with pytest.raises(ValueError, match="no class sub-folders") as error:
        load_tasks(TTAScriptArguments(model="unused", tasks=[str(task_folders["flat"])]))
    assert str(task_folders["flat"]) in str(error.value)


@pytest.mark.parametrize("command", ["tta-wemoe", "eval"])
def test_commands_refuse_a_one_class_folder_in_one_line_writing_nothing(
    command, toy_clip_dir, task_folders, tmp_path, capsys
):
    folder, out = str(task_folders["one_class"]), tmp_path / "out"
    if command == "tta-wemoe":
        argv = ["tta-wemoe", "--model", str(toy_clip_dir), "--tasks", folder, "--output_dir", str(out), *TTA_FLAGS]
    else:
        argv = ["eval", "zero-shot", "--model", str(toy_clip_dir), "--data", folder, "--output", str(out / "r.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: The data in {folder} has no class labels" in err and "single class sub-folder" in err
    assert "Traceback" not in err and not out.exists()


def test_the_generic_message_names_where_the_images_are(task_folders):
    """Callers that pass no folder (hf-moe mode report) still get it, read from the images' paths."""
    from hf_moe.evaluation import dataset_class_names, load_image_dataset

    with pytest.raises(ValueError, match=re.escape(f"The data in {task_folders['one_class'] / 'cat'} has no class")):
        dataset_class_names(load_image_dataset(task_folders["one_class"]))


# ---- item 11: image paths of captioned folders stay inside them ----------------------------------------------------


@pytest.fixture
def captioned(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(folder / name)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "outside.png")
    return folder


def write_metadata(folder, file_names):
    rows = [json.dumps({"file_name": name, "text": f"a photo {i}"}) for i, name in enumerate(file_names)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("bad", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_metadata_image_paths_outside_the_folder_are_refused_naming_file_line_value(captioned, bad):
    bad = str(captioned.parent / "outside.png") if bad == "ABSOLUTE" else bad
    write_metadata(captioned, ["a.png", "b.png", bad])
    with pytest.raises(ValueError) as error:
        load_image_text_dataset(captioned)
    message = str(error.value)
    assert f"{captioned / 'metadata.jsonl'} line 3: file_name {bad!r} lies outside" in message
    assert "allow_outside_image_paths" in message


def test_metadata_paths_inside_the_folder_are_accepted(captioned):
    (captioned / "sub").mkdir()
    write_metadata(captioned, ["a.png", "sub/../b.png"])
    assert len(load_image_text_dataset(captioned)) == 2


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_outside_paths_load_when_explicitly_allowed(captioned, monkeypatch, how):
    write_metadata(captioned, ["a.png", "../outside.png", str(captioned.parent / "outside.png")])
    if how == "argument":
        dataset = load_image_text_dataset(captioned, allow_outside_image_paths=True)
    else:
        monkeypatch.setenv("HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS", "1")
        dataset = load_image_text_dataset(captioned)
    assert len(dataset) == 3 and dataset[0]["text"] == "a photo 0"
    assert dataset[1]["image"].getpixel((0, 0)) == (255, 0, 0) and dataset[2]["image"].getpixel((0, 0)) == (255, 0, 0)


def test_mcl_refuses_a_dot_dot_path_in_one_line_writing_nothing(toy_clip_dir, captioned, tmp_path, capsys):
    write_metadata(captioned, ["a.png", "../outside.png"])
    out = tmp_path / "mcl"
    assert main(["mcl", "--base", str(toy_clip_dir), "--data", str(captioned), "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "hf-moe mcl: error:" in err and "metadata.jsonl line 2: file_name '../outside.png'" in err
    assert "Traceback" not in err and not out.exists()


# ---- item 14: a toy hf-moe mcl prints what matters ------------------------------------------------------------------


# A tqdm bar's first frame: "DESCRIPTION:   0%|          | 0/N [" (a bar without a description starts at "  0%|").
BAR_START = re.compile(r"(?:^|[\r\n])(?:(?P<desc>[^\r\n]*?): *)? *(?<![0-9])0%\|")


def test_toy_mcl_prints_one_bar_per_phase_and_names_the_final_folder(toy_clip_dir, tmp_path):
    data = save_digit_caption_folder(tmp_path / "captions", count=48)
    out = tmp_path / "mcl"
    argv = ["mcl", "--base", str(toy_clip_dir), "--data", str(data), "--output_dir", str(out), "--num_experts", "2"]
    argv += ["--top_k", "1", "--image_clusters", "2", "--text_clusters", "2", "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none"]
    # A fresh process, as a user runs it: the DeepSpeed notice is printed once per process, at its import.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    code = "import sys; from hf_moe.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Setting accelerator" not in output
    assert "Downloading data" not in output and "Generating train split" not in output
    assert "Loading weights" not in output and "Writing model shards" not in output
    # Phases: the data check, then per stage its features and its training (one stage here).
    bars = [match.group("desc") or "" for match in BAR_START.finditer(output)]
    assert len(bars) <= 3 and set(bars) <= {"Checking images and captions", "feature shards", ""}, bars
    assert ".tmp-" not in output
    last = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()][-1]
    assert str(out / "moe") in last and "MCL finished" in last, last


def test_metadata_that_is_not_json_is_refused_naming_the_line(captioned):
    (captioned / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", text}\n')
    with pytest.raises(ValueError, match=re.escape(f"{captioned / 'metadata.jsonl'} line 2 is not JSON")):
        load_image_text_dataset(captioned)


def test_the_deepspeed_cpu_notice_is_dropped_only_when_deepspeed_is_not_asked_for(tmp_path, monkeypatch):
    import logging

    from hf_moe.log_noise import DEEPSPEED_LOGGER, _drop_deepspeed_cpu_notice, deepspeed_requested, quiet_library_noise

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    options = tmp_path / "args.json"
    options.write_text(json.dumps({"deepspeed": "zero2.json"}))
    assert deepspeed_requested(["--deepspeed", "zero2.json"]) and deepspeed_requested([str(options)])
    assert not deepspeed_requested(["--model", "m", "--output_dir", "o"])
    deepspeed_logger = logging.getLogger(DEEPSPEED_LOGGER)
    monkeypatch.setattr(deepspeed_logger, "filters", [])
    quiet_library_noise(["--deepspeed", "zero2.json"])
    assert _drop_deepspeed_cpu_notice not in deepspeed_logger.filters
    quiet_library_noise(["--output_dir", "o"])
    notice = logging.LogRecord(DEEPSPEED_LOGGER, logging.WARNING, "", 0, "Setting accelerator to CPU.", None, None)
    other = logging.LogRecord(DEEPSPEED_LOGGER, logging.WARNING, "", 0, "ZeRO stage 3 enabled", None, None)
    assert not deepspeed_logger.filter(notice) and deepspeed_logger.filter(other)

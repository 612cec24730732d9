"""Jobs and their output folders: one writer per folder (a second run is refused naming the first, a killed run's
lock is taken over), a job killed during its final save never trains past max_steps when resumed (every trainer),
and a job that failed before its first complete checkpoint starts over when re-run on corrected data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hf_moe.cli import main
from hf_moe.fileio import (
    OutputDirLock,
    OutputFolderLocked,
    atomic_output_dir,
    check_output_dir,
    lock_path,
    output_dirs_held,
)
from hf_moe.toy_data import save_digit_caption_folder, save_digit_class_folders
from hf_moe.training import JOB_FILE, JobMismatchError, TrainingJob, input_fingerprint

from helpers import save_vision_finetunes


FLAGS = ["--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return save_digit_caption_folder(tmp_path_factory.mktemp("jobs-data") / "captions", count=32)


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-tasks")
    return [save_digit_class_folders(root / "digits_a", 12), save_digit_class_folders(root / "digits_b", 10, 32, 40)]


def weights(folder) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(file))
    assert state, f"no weights in {folder}"
    return state


def job_record(folder) -> dict:
    return json.loads((folder / JOB_FILE).read_text())


def mark_incomplete(folder) -> None:
    (folder / JOB_FILE).write_text(json.dumps({**job_record(folder), "complete": False}))


# ---- one writer per output folder ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from hf_moe.fileio import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""

# `hf-moe ARGS...` whose training waits for the file GO before its first step (the job is checked and recorded).
PAUSED_COMMAND = """
import os, sys, time
import transformers

train = transformers.Trainer.train

def paused_train(self, *args, **kwargs):
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.05)
    return train(self, *args, **kwargs)

transformers.Trainer.train = paused_train
from hf_moe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(script, *args, env=None):
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return process


def wait_for_lock(process, folder, timeout=120):
    """Wait until `process` holds the lock of `folder` (its record names its pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the holder ended early:\n{process.stdout.read()}"
        try:
            if json.loads(lock_path(folder).read_text())["pid"] == process.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {process.pid} did not lock {folder} in {timeout} s")


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path / "out"; SIGKILLed at the end."""
    out = tmp_path / "out"
    process = start(HOLDER, out)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield out, process
    finally:
        process.kill()
        process.wait(timeout=30)


def tta(model, task_dirs, out, *extra):
    argv = ["tta-wemoe", "--model", str(model), "--tasks", *map(str, task_dirs), "--output_dir", str(out), *FLAGS]
    argv += ["--per_device_train_batch_size", "4", "--trainable_parameters", "post_layernorm", "--templates"]
    return [*argv, "default", *extra]


def test_two_tta_wemoe_runs_on_one_folder_the_second_is_refused_naming_the_first(
    toy_clip_dir, task_dirs, tmp_path, capsys
):
    out, go = tmp_path / "adapted", tmp_path / "go"
    first = start(PAUSED_COMMAND, *tta(toy_clip_dir, task_dirs, out, "--max_steps", "2", "--learning_rate", "0.01"),
                  env={"GO": str(go)})  # fmt: skip
    try:
        wait_for_lock(first, out)
        assert main(tta(toy_clip_dir, task_dirs, out, "--max_steps", "2", "--learning_rate", "0.05")) == 1
        error = capsys.readouterr().err
        assert f"process {first.pid}" in error and "tta-wemoe" in error and "being written by another run" in error
        go.touch()
        output, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, output
    # The folder is the first run's alone: its options recorded as complete, its model saved.
    job = job_record(out)
    assert job["complete"] is True and job["options"]["learning_rate"] == 0.01 and job["global_step"] == 2
    assert weights(out) and not lock_path(out).exists()  # released at the end
    # ...and a later run with the second's options is refused as a different job, not reported "already complete".
    assert main(tta(toy_clip_dir, task_dirs, out, "--max_steps", "2", "--learning_rate", "0.05")) == 1
    assert "--learning_rate: 0.01 (recorded) vs 0.05 (now)" in capsys.readouterr().err


def test_upcycle_clip_into_a_folder_another_process_writes_is_refused(toy_clip_dir, holder, capsys):
    out, process = holder
    argv = ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--top_k", "1", "--output_dir", str(out)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert f"process {process.pid}" in error and "being written by another run" in error
    assert not out.exists()
    with pytest.raises(OutputFolderLocked, match=f"process {process.pid}"):
        with atomic_output_dir(out):
            pytest.fail("the body must not run")


TRY_LOCK = """
import sys
from hf_moe.fileio import OutputDirLock, OutputFolderLocked
try:
    OutputDirLock(sys.argv[1]).acquire()
    print("locked")
except OutputFolderLocked as err:
    print(err)
"""


def test_a_command_holds_the_folder_it_checked_until_it_returns(tmp_path):
    out = tmp_path / "out"
    with output_dirs_held():  # as the command line runs every command
        check_output_dir(out)  # a converter's first step, before any work
        refused = subprocess.run([sys.executable, "-c", TRY_LOCK, str(out)], capture_output=True, text=True)
        assert f"process {os.getpid()}" in refused.stdout, refused.stdout + refused.stderr
        assert lock_path(out).exists()
    assert not lock_path(out).exists()
    check_output_dir(out)  # outside such a block the lock is only checked, not taken
    assert not lock_path(out).exists()


def test_a_training_job_refuses_a_folder_another_process_writes(holder):
    out, process = holder
    with pytest.raises(OutputFolderLocked, match=f"process {process.pid}") as error:
        TrainingJob(out, "demo", {"lr": 0.1}).check()
    assert isinstance(error.value, OSError)  # the CLI prints it in one line
    assert not out.exists()


def test_the_lock_of_a_killed_run_is_taken_over(toy_clip_dir, tmp_path, caplog):
    from hf_moe.conversion import upcycle_clip

    out = tmp_path / "moe"
    killed = start(HOLDER, out)
    assert killed.stdout.readline().strip() == "locked"
    killed.send_signal(signal.SIGKILL)  # no cleanup runs: its lock file and record stay
    killed.wait(timeout=30)
    assert str(killed.pid) in lock_path(out).read_text()
    with caplog.at_level("WARNING"):
        upcycle_clip(toy_clip_dir, out, num_experts=2, top_k=1, seed=0)
    assert f"Taking over the lock of {out}" in caplog.text and f"process {killed.pid}" in caplog.text
    assert (out / "model.safetensors").is_file() and not lock_path(out).exists()


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_job(tmp_path):
    out = tmp_path / "out"
    job = TrainingJob(out, "demo", {"lr": 0.1})
    job.check()
    job.record()
    with atomic_output_dir(out / "final") as tmp:  # another folder: another lock
        (tmp / "a.txt").write_text("a")
    with OutputDirLock(out), atomic_output_dir(out, overwrite=True) as tmp:  # the job's own folder, nested
        (tmp / "b.txt").write_text("b")
    assert lock_path(out).exists()  # still the job's
    job.release()
    assert not lock_path(out).exists()
    # An abandoned job's lock goes with the job object.
    job = TrainingJob(out, "demo", {"lr": 0.1})
    job.check()
    assert lock_path(out).exists()
    del job
    assert not lock_path(out).exists()


# ---- a kill during the final save: never train past max_steps ------------------------------------------------


def _router(ctx, out):
    argv = ["train-router", "--model", str(ctx["upcycled"]), "--data", str(ctx["captions"]), "--output_dir", str(out)]
    # 32 captions in batches of 8: 4 steps an epoch, so step 3 is inside the first epoch
    return main([*argv, *FLAGS, "--per_device_train_batch_size", "8", "--learning_rate", "0.05", "--max_steps", "3"])


def _tta(ctx, out):
    return main(tta(ctx["clip"], ctx["tasks"], out, "--max_steps", "3", "--learning_rate", "0.05"))


def _adamerging(ctx, out):
    argv = ["adamerging", "--pretrained", str(ctx["clip"]), "--finetuned", *map(str, ctx["finetuned"])]
    argv += ["--tasks", *map(str, ctx["tasks"]), "--templates", "default", "--output_dir", str(out), *FLAGS]
    return main([*argv, "--per_device_train_batch_size", "4", "--learning_rate", "0.05", "--max_steps", "3"])


def _expert(ctx, out):
    from hf_moe.mode.train_expert import main as train_expert

    argv = ["--seed_model", str(ctx["clip"]), "--data", str(ctx["captions"]), "--clusters", str(ctx["clusters"])]
    argv += ["--expert", "0", "--output_dir", str(out), "--other_share", "0.25", "--seed", "0", *FLAGS]
    # expert 0's ~20 rows in batches of 8: 3 steps an epoch, so step 2 is inside the first epoch
    argv += ["--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_steps", "2"]
    train_expert(argv)
    return 0


def _moiie(ctx, out):
    inputs = ctx["moiie"]
    argv = ["train-moiie", "--model", str(inputs / "model"), "--data", str(inputs / "data.json"), "--stage"]
    argv += ["finetune", "--image_folder", str(inputs / "images"), "--output_dir", str(out), *FLAGS]
    # 8 samples in batches of 2: 4 steps an epoch, so step 3 is inside the first epoch
    argv += ["--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--max_steps", "3", "--seed", "3"]
    return main([*argv, "--log_expert_load", "none"])


def _mcl(ctx, out):
    argv = ["mcl", "--base", str(ctx["clip"]), "--data", str(ctx["captions"]), "--output_dir", str(out)]
    argv += ["--num_experts", "2", "--top_k", "1", "--image_clusters", "2", "--text_clusters", "1", *FLAGS]
    return main([*argv, "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "2"])


@pytest.fixture(scope="module")
def trainer_inputs(toy_clip_dir, upcycled_dir, captions, task_dirs, tmp_path_factory):
    from test_moiie_training import SAMPLES, toy_model, toy_processor

    from hf_moe.data import load_image_text_dataset
    from hf_moe.mode.data import dataset_pair_keys

    root = tmp_path_factory.mktemp("jobs-trainers")
    finetuned = save_vision_finetunes(toy_clip_dir, root)
    # MoDE clusters as `hf-moe mode cluster` writes them: fine cluster = digit % 4, expert = fine % 2.
    dataset = load_image_text_dataset(captions)
    fine = torch.tensor(dataset["label"]) % 4
    fine_to_coarse = torch.tensor([0, 1, 0, 1])
    clusters = root / "clusters"
    (clusters / "assignments").mkdir(parents=True)
    table = {"key": dataset_pair_keys(dataset), "fine": fine.tolist(), "coarse": fine_to_coarse[fine].tolist()}
    pq.write_table(pa.table(table), clusters / "assignments" / "part-00000.parquet")
    save_file({"fine_to_coarse": fine_to_coarse, "fine_centers": torch.randn(4, 8)}, clusters / "centers.safetensors")
    encoder = {"name_or_path": "toy-clip", "pooling": "clip", "max_length": 16}
    (clusters / "clusters.json").write_text(json.dumps({"num_fine_clusters": 4, "num_experts": 2, "encoder": encoder}))
    # A toy MoIIE and its conversations (as tests/test_moiie_train_command.py).
    moiie = root / "moiie"
    (moiie / "images").mkdir(parents=True)
    for seed, name in enumerate(["seven.png", "three.png"]):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(moiie / "images" / name)
    (moiie / "data.json").write_text(json.dumps(SAMPLES * 4))
    processor = toy_processor()
    toy_model(processor).save_pretrained(moiie / "model")
    processor.save_pretrained(moiie / "model")
    return {
        "clip": toy_clip_dir,
        "upcycled": upcycled_dir,
        "captions": captions,
        "tasks": task_dirs,
        "finetuned": finetuned,
        "clusters": clusters,
        "moiie": moiie,
    }


TRAINERS = {
    "train-router": _router,
    "tta-wemoe": _tta,
    "adamerging": _adamerging,
    "mode-train-expert": _expert,
    "train-moiie": _moiie,
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_kill_during_the_final_save_resumes_without_training_past_max_steps(name, trainer_inputs, tmp_path, caplog):
    run, out = TRAINERS[name], tmp_path / "out"
    assert run(trainer_inputs, out) == 0
    max_steps = job_record(out)["global_step"]
    final = weights(out)
    last = out / f"checkpoint-{max_steps}"  # the Trainer always saves at max_steps
    assert (last / "trainer_state.json").is_file()
    # What a kill while the final model is written leaves: the last checkpoint, no final model, the job unfinished.
    for path in [*out.glob("model*.safetensors"), out / "config.json"]:
        path.unlink()
    mark_incomplete(out)
    with caplog.at_level("WARNING"):
        assert run(trainer_inputs, out) == 0
    job = job_record(out)
    assert job["complete"] is True and job["global_step"] == max_steps
    assert not (out / f"checkpoint-{max_steps + 1}").exists()
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == max_steps
    resumed = weights(out)
    assert resumed.keys() == final.keys()
    for key in final:  # exactly the uninterrupted run's: the checkpoint's weights, no step more
        assert torch.equal(resumed[key], final[key]), key
    assert f"({max_steps} of {max_steps})" in caplog.text


def test_mcl_killed_while_saving_a_stage_resumes_without_training_past_max_steps(trainer_inputs, tmp_path, caplog):
    out = tmp_path / "mcl"
    assert _mcl(trainer_inputs, out) == 0
    stage1 = load_file(out / "stage1" / "model.safetensors")
    # A kill while stage 1's model was written (after its last checkpoint): no stage1, no moe, the job unfinished.
    shutil.rmtree(out / "stage1")
    shutil.rmtree(out / "moe")
    mark_incomplete(out)
    with caplog.at_level("WARNING"):
        assert _mcl(trainer_inputs, out) == 0
    assert not (out / "stage1-run" / "checkpoint-3").exists()
    resumed = load_file(out / "stage1" / "model.safetensors")
    for key in stage1:
        assert torch.equal(resumed[key], stage1[key]), key
    assert "(2 of 2)" in caplog.text
    assert job_record(out)["complete"] is True


# ---- a re-run after fixing the data ------------------------------------------------------------------------------


def train_router(model, data, out, *extra):
    argv = ["train-router", "--model", str(model), "--data", str(data), "--output_dir", str(out), *FLAGS]
    return main([*argv, "--per_device_train_batch_size", "8", "--learning_rate", "0.05", *extra])


def add_caption(folder):
    first = sorted(path.name for path in folder.glob("*.png"))[0]
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write(json.dumps({"file_name": first, "text": "a handwritten digit"}) + "\n")


def test_a_job_that_failed_before_its_first_complete_checkpoint_starts_over_on_corrected_data(
    upcycled_dir, captions, tmp_path, caplog
):
    data, out = tmp_path / "captions", tmp_path / "routed"
    shutil.copytree(captions, data)
    assert train_router(upcycled_dir, data, out, "--max_steps", "2", "--save_steps", "1") == 0
    # Make `out` what a run that failed during its first checkpoint write leaves: checkpoint-1 without its
    # trainer_state.json, no later checkpoint, no final model, the job not complete.
    shutil.rmtree(out / "checkpoint-2")
    (out / "checkpoint-1" / "trainer_state.json").unlink()
    for path in [*out.glob("model*.safetensors"), out / "config.json"]:
        path.unlink()
    mark_incomplete(out)
    add_caption(data)  # the data, fixed
    with caplog.at_level("WARNING"):
        assert train_router(upcycled_dir, data, out, "--max_steps", "2", "--save_steps", "1") == 0
    assert "Starting over" in caplog.text and "checkpoint-1" in caplog.text and "data:" in caplog.text
    assert "Resuming" not in caplog.text
    job = job_record(out)
    assert job["complete"] is True and job["global_step"] == 2 and job["inputs"]["data"] == input_fingerprint(data)
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


def test_after_a_complete_checkpoint_the_refusal_says_how_to_start_over(upcycled_dir, captions, tmp_path, capsys):
    data, out = tmp_path / "captions", tmp_path / "routed"
    shutil.copytree(captions, data)
    assert train_router(upcycled_dir, data, out, "--max_steps", "2", "--save_steps", "1") == 0
    shutil.rmtree(out / "checkpoint-2")  # stopped after checkpoint-1
    mark_incomplete(out)
    add_caption(data)
    before = sorted(path.name for path in out.rglob("*"))
    assert train_router(upcycled_dir, data, out, "--max_steps", "2", "--save_steps", "1") == 1
    error = capsys.readouterr().err
    assert "data:" in error and "checkpoint-1" in error
    assert f"`rm -r {out}`" in error and "new --output_dir" in error
    assert sorted(path.name for path in out.rglob("*")) == before


def fake_checkpoint(folder, step):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    torch.save({"state": {}}, folder / "optimizer.pt")


@pytest.mark.parametrize("stage_checkpoint", ["incomplete", "complete"])
def test_an_mcl_like_job_starts_over_only_without_a_complete_checkpoint(tmp_path, stage_checkpoint, caplog):
    owned = ("stage*", "labels", "features", "moe")
    TrainingJob(tmp_path, "mcl", {"lr": 0.1}, inputs={"data": {"name": "a"}}, owned_outputs=owned).record()
    for name in ("stage0", "labels", "features"):  # computed from the old data before stage 1's first step
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.safetensors").write_bytes(b"x")
    fake_checkpoint(tmp_path / "stage1-run" / "checkpoint-1", 1)
    if stage_checkpoint == "incomplete":
        (tmp_path / "stage1-run" / "checkpoint-1" / "trainer_state.json").unlink()
    (tmp_path / "notes.txt").write_text("the user's")
    job = TrainingJob(tmp_path, "mcl", {"lr": 0.1}, inputs={"data": {"name": "b"}}, owned_outputs=owned)
    if stage_checkpoint == "complete":
        with pytest.raises(JobMismatchError, match="rm -r"):
            job.check()
        assert (tmp_path / "labels").is_dir() and (tmp_path / "stage1-run" / "checkpoint-1").is_dir()
        return
    with caplog.at_level("WARNING"):
        job.check()
    assert "Starting over" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == [JOB_FILE, "notes.txt"]
    job.record()
    assert job_record(tmp_path)["inputs"] == {"data": {"name": "b"}}

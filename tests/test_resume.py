"""Re-running a training command continues the same job or refuses: finished jobs are left untouched, changed
options, models or data are refused with the differences named, and an interrupted job resumes from its last
COMPLETE checkpoint (a kill during a checkpoint write must not break every later resume)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_moe.cli import main
from hf_moe.toy_data import save_digit_caption_folder
from hf_moe.training import (
    JOB_FILE,
    JobMismatchError,
    TrainingJob,
    checkpoint_problem,
    input_fingerprint,
    last_complete_checkpoint,
)


FLAGS = ["--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0"]
FLAGS += ["--learning_rate", "0.05", "--warmup_steps", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return save_digit_caption_folder(tmp_path_factory.mktemp("resume-data") / "captions", count=32)


def train_router(model, data, out, *extra):
    return main(["train-router", "--model", str(model), "--data", str(data), "--output_dir", str(out), *FLAGS, *extra])


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---- complete checkpoints ---------------------------------------------------------------------------------------


def fake_checkpoint(folder, step, *, state=True, weights=True, optimizer=True):
    folder.mkdir(parents=True)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if weights:
        save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
    if optimizer:
        torch.save({"state": {}}, folder / "optimizer.pt")
    return folder


def test_last_complete_checkpoint_skips_interrupted_writes(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-2", 2)
    fake_checkpoint(tmp_path / "checkpoint-10", 10)
    fake_checkpoint(tmp_path / "checkpoint-12", 12, state=False)  # killed before trainer_state.json
    truncated_weights = fake_checkpoint(tmp_path / "checkpoint-14", 14)
    data = (truncated_weights / "model.safetensors").read_bytes()
    (truncated_weights / "model.safetensors").write_bytes(data[: len(data) - 10])
    truncated_state = fake_checkpoint(tmp_path / "checkpoint-16", 16)
    (truncated_state / "trainer_state.json").write_text('{"global_st')
    fake_checkpoint(tmp_path / "checkpoint-18", 18, optimizer=False)
    truncated_optimizer = fake_checkpoint(tmp_path / "checkpoint-20", 20)
    data = (truncated_optimizer / "optimizer.pt").read_bytes()
    (truncated_optimizer / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        # checkpoint-10, not checkpoint-2: numeric order, not alphabetical
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    for step in (12, 14, 16, 18, 20):
        assert f"checkpoint-{step}" in caplog.text
    assert "no trainer_state.json" in checkpoint_problem(tmp_path / "checkpoint-12")
    assert "model.safetensors" in checkpoint_problem(tmp_path / "checkpoint-14")
    assert "trainer_state.json" in checkpoint_problem(tmp_path / "checkpoint-16")
    assert "optimizer" in checkpoint_problem(tmp_path / "checkpoint-18")
    assert "optimizer.pt" in checkpoint_problem(tmp_path / "checkpoint-20")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_train_router_resumes_from_the_last_complete_checkpoint(upcycled_dir, captions, tmp_path, caplog):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    args = ["--max_steps", "4", "--save_steps", "2"]
    assert train_router(upcycled_dir, captions, reference, *args) == 0
    assert train_router(upcycled_dir, captions, interrupted, *args) == 0
    # Make `interrupted` what a kill during the step-4 checkpoint write leaves: checkpoint-4 without its
    # trainer_state.json, no final model, the job not complete.
    (interrupted / "checkpoint-4" / "trainer_state.json").unlink()
    (interrupted / "model.safetensors").unlink()
    (interrupted / "config.json").unlink()
    job = json.loads((interrupted / JOB_FILE).read_text()) if (interrupted / JOB_FILE).exists() else None
    if job is not None:
        (interrupted / JOB_FILE).write_text(json.dumps({**job, "complete": False}))
    with caplog.at_level("WARNING"):
        assert train_router(upcycled_dir, captions, interrupted, *args) == 0
    assert "incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert f"Resuming router training from {interrupted / 'checkpoint-2'}" in caplog.text
    assert json.loads((interrupted / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    # Steps 3 and 4 repeated from the checkpoint's state give the uninterrupted run's routers.
    expected, resumed = load_file(reference / "model.safetensors"), load_file(interrupted / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], msg=key)
    assert job is not None and json.loads((interrupted / JOB_FILE).read_text())["complete"] is True


# ---- finished jobs, changed jobs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(upcycled_dir, captions, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "routed"
    assert train_router(upcycled_dir, captions, out, "--max_steps", "2", "--save_steps", "1") == 0
    return out


def test_rerunning_a_finished_train_router_leaves_it_untouched(upcycled_dir, captions, finished_run, caplog):
    before = snapshot(finished_run)
    with caplog.at_level("WARNING"):
        assert train_router(upcycled_dir, captions, finished_run, "--max_steps", "2", "--save_steps", "1") == 0
    assert "already complete" in caplog.text
    assert snapshot(finished_run) == before
    assert not (finished_run / "checkpoint-3").exists()


def test_train_router_refuses_another_models_output_folder(toy_clip_dir, captions, finished_run, tmp_path, capsys):
    from hf_moe.conversion import upcycle_clip

    other = tmp_path / "other-moe"
    upcycle_clip(toy_clip_dir, other, num_experts=2, top_k=1, seed=1)
    before = snapshot(finished_run)
    assert train_router(other, captions, finished_run, "--max_steps", "2", "--save_steps", "1") == 1
    error = capsys.readouterr().err
    assert "--model:" in error and str(other) in error and "(recorded)" in error
    assert snapshot(finished_run) == before


def test_train_router_refuses_changed_options_and_data(upcycled_dir, captions, finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    assert train_router(upcycled_dir, captions, finished_run, "--max_steps", "3", "--save_steps", "1") == 1
    assert "--max_steps: 2 (recorded) vs 3 (now)" in capsys.readouterr().err
    assert (
        train_router(upcycled_dir, captions, finished_run, "--max_steps", "2", "--save_steps", "1", "--seed", "7") == 1
    )
    assert "--seed: 42 (recorded) vs 7 (now)" in capsys.readouterr().err
    changed = tmp_path / "changed-captions"
    shutil.copytree(captions, changed)  # same files, same times: the same data under another path...
    assert snapshot(finished_run) == before
    assert train_router(upcycled_dir, changed, finished_run, "--max_steps", "2", "--save_steps", "1") == 0
    with (changed / "metadata.jsonl").open("a") as metadata:  # ...until a row is added
        metadata.write(json.dumps({"file_name": sorted(p.name for p in changed.glob("*.png"))[0], "text": "x"}) + "\n")
    assert train_router(upcycled_dir, changed, finished_run, "--max_steps", "2", "--save_steps", "1") == 1
    assert "data:" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_train_router_refuses_checkpoints_no_job_recorded(upcycled_dir, captions, tmp_path, capsys):
    out = tmp_path / "routed"
    fake_checkpoint(out / "checkpoint-5", 5)
    assert train_router(upcycled_dir, captions, out, "--max_steps", "2") == 1
    assert "checkpoint-5" in capsys.readouterr().err
    assert not (out / JOB_FILE).exists()


def test_train_router_rejects_a_dense_model_without_writing(toy_clip_dir, captions, tmp_path, capsys):
    out = tmp_path / "routed"
    assert train_router(toy_clip_dir, captions, out, "--max_steps", "2") == 1
    error = capsys.readouterr().err
    assert "not a CLIP-MoE" in error and str(toy_clip_dir) in error
    assert not out.exists() or not any(out.iterdir())


def test_training_job_records_once_and_compares_options(tmp_path):
    job = TrainingJob(tmp_path / "out", "demo", {"lr": 0.1, "steps": 3}, inputs={"data": {"name": "a"}})
    job.check()
    job.record()
    assert not job.is_complete()
    TrainingJob(tmp_path / "out", "demo", {"lr": 0.1, "steps": 3}, inputs={"data": {"name": "a"}}).check()
    changed = TrainingJob(tmp_path / "out", "demo", {"lr": 0.2, "steps": 3}, inputs={"data": {"name": "b"}})
    fake_checkpoint(tmp_path / "out" / "checkpoint-1", 1)  # the recorded job has made progress
    with pytest.raises(JobMismatchError) as error:
        changed.check()
    assert "--lr: 0.1 (recorded) vs 0.2 (now)" in str(error.value) and "data: 'a' (recorded) vs 'b'" in str(error.value)
    job.mark_complete(global_step=3)
    assert job.is_complete() and json.loads(job.path.read_text())["global_step"] == 3
    (tmp_path / "out" / JOB_FILE).write_text("{trunc")
    with pytest.raises(JobMismatchError, match="not a job record"):
        job.check()


def test_input_fingerprint_sees_added_resized_and_touched_files(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = input_fingerprint(tmp_path)
    assert input_fingerprint(tmp_path) == first
    (tmp_path / "b.txt").write_text("two")
    second = input_fingerprint(tmp_path)
    assert second != first and second["files"] == 2
    (tmp_path / "b.txt").write_text("tw2")  # same size, new contents (and modification time)
    import os

    os.utime(tmp_path / "b.txt", ns=(1, 1))
    assert input_fingerprint(tmp_path) != second
    assert input_fingerprint("org/dataset") == {"name": "org/dataset"}


def test_mcl_resumes_a_stage_from_its_last_complete_checkpoint(toy_clip_dir, captions, tmp_path, caplog):
    out = tmp_path / "mcl"
    argv = ["mcl", "--base", str(toy_clip_dir), "--data", str(captions), "--output_dir", str(out)]
    argv += ["--num_experts", "2", "--top_k", "1", "--image_clusters", "2", "--text_clusters", "1"]
    argv += [*FLAGS, "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1"]
    argv += ["--learning_rate", "1e-3"]
    assert main(argv) == 0
    uninterrupted = load_file(out / "stage1" / "model.safetensors")
    # What a kill while writing stage 1's step-2 checkpoint leaves: no stage1, no moe, the job not complete.
    shutil.rmtree(out / "stage1")
    shutil.rmtree(out / "moe")
    (out / "stage1-run" / "checkpoint-2" / "trainer_state.json").unlink()
    job = json.loads((out / JOB_FILE).read_text()) if (out / JOB_FILE).exists() else None
    if job is not None:
        (out / JOB_FILE).write_text(json.dumps({**job, "complete": False}))
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert f"Resuming MCL stage 1 from {out / 'stage1-run' / 'checkpoint-1'}" in caplog.text
    resumed = load_file(out / "stage1" / "model.safetensors")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], msg=key)
    assert (out / "moe" / "model.safetensors").is_file()
    assert job is not None and json.loads((out / JOB_FILE).read_text())["complete"]


def test_a_recorded_job_that_wrote_nothing_may_be_replaced(tmp_path, caplog):
    TrainingJob(tmp_path, "demo", {"lr": 0.1}).record()  # ...then it crashed before its first checkpoint
    retry = TrainingJob(tmp_path, "demo", {"lr": 0.2})
    with caplog.at_level("WARNING"):
        retry.check()
    assert "Starting over" in caplog.text
    retry.record()
    assert json.loads((tmp_path / JOB_FILE).read_text())["options"] == {"lr": 0.2}
    TrainingJob(tmp_path, "demo", {"lr": 0.2}).check()
    TrainingJob(tmp_path, "demo", {"lr": 0.2}).mark_complete()
    with pytest.raises(JobMismatchError):  # a finished job is never replaced
        TrainingJob(tmp_path, "demo", {"lr": 0.3}).check()

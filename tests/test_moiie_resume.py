"""`hf-moe train-moiie` killed (SIGKILL, in a subprocess) after its first complete checkpoint and run again (in this
process) resumes from that checkpoint, finishes at max_steps, and ends with the weights of an uninterrupted run."""

import json
import subprocess
import sys
import time

import torch
from test_moiie_train_command import inputs, weights  # noqa: F401 (inputs is a fixture)

from hf_moe.cli import main
from hf_moe.training import JOB_FILE, last_complete_checkpoint


MAX_STEPS = 4


def argv(inputs, out):  # noqa: F811
    args = ["train-moiie", "--model", str(inputs / "model"), "--data", str(inputs / "data.json")]
    args += ["--image_folder", str(inputs / "images"), "--output_dir", str(out), "--stage", "finetune"]
    args += ["--max_steps", str(MAX_STEPS), "--save_steps", "1", "--per_device_train_batch_size", "2"]
    args += ["--learning_rate", "1e-2", "--seed", "3", "--use_cpu", "--dataloader_num_workers", "0"]
    return args + ["--report_to", "none", "--disable_tqdm", "true", "--log_expert_load", "none"]


def command(args) -> list[str]:
    return [sys.executable, "-m", "hf_moe.cli", *args]


def kill_after_first_checkpoint(process, out, timeout=240):
    """SIGKILL `process` as soon as `out` holds a complete checkpoint; the step it reached is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended (exit {process.returncode}) before it could be killed")
        if any(out.glob("checkpoint-*/trainer_state.json")) and last_complete_checkpoint(out):
            process.kill()
            process.wait()
            return int(last_complete_checkpoint(out).rsplit("-", 1)[1])
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no complete checkpoint in {out} after {timeout} s")


def test_killed_train_moiie_resumes_to_the_uninterrupted_result(inputs, tmp_path, caplog):  # noqa: F811
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(
            command(argv(inputs, interrupted)), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        step = kill_after_first_checkpoint(process, interrupted)
    assert step < MAX_STEPS and not (interrupted / "model.safetensors").exists()
    assert not json.loads((interrupted / JOB_FILE).read_text()).get("complete")

    # The same command again, in this process (one interpreter start less).
    with caplog.at_level("WARNING"):
        assert main(argv(inputs, interrupted)) == 0
    assert f"Resuming MoIIE training from {interrupted / f'checkpoint-{step}'}" in caplog.text
    state = json.loads((interrupted / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    job = json.loads((interrupted / JOB_FILE).read_text())
    assert job["complete"] is True and job["global_step"] == MAX_STEPS

    assert main(argv(inputs, reference)) == 0
    expected, resumed, initial = weights(reference), weights(interrupted), weights(inputs / "model")
    assert expected.keys() == resumed.keys()
    changed = [key for key in expected if not torch.equal(expected[key], initial[key])]
    assert changed  # the comparison is between trained weights
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-5, rtol=0, msg=key)

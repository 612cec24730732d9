"""The example scripts run under plain `python` and as several processes (torchrun, as `accelerate launch`
starts them on GPUs; on CPU-only machines accelerate starts a single process, so torchrun stands in)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_moe.toy_data import save_digit_caption_folder


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "clip_moe"
COMMON = ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--dataloader_num_workers", "0"]
# The recipes warm up for 200 steps; these runs take 2.
COMMON += ["--warmup_steps", "0", "--learning_rate", "1e-3"]


def run(command, cwd):
    result = subprocess.run(command, cwd=cwd, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited with {result.returncode}:\n{result.stderr}"


# On a machine without GPUs, accelerate launch starts one process; the two-process case is torchrun's below.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
ACCELERATE += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize("launcher", [[sys.executable], ACCELERATE], ids=["python", "accelerate-launch"])
def test_router_training_script_runs_under_python_and_accelerate_launch(upcycled_dir, tmp_path, launcher):
    data = save_digit_caption_folder(tmp_path / "captions", count=32)
    out = tmp_path / "routed"
    args = ["--model", str(upcycled_dir), "--data", str(data), "--output_dir", str(out), "--max_steps", "2"]
    script = [str(EXAMPLES / "train_clip_moe.py"), *args, "--per_device_train_batch_size", "8", *COMMON]
    run([*launcher, *script], tmp_path)
    before, after = load_file(upcycled_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [key for key in after if not torch.equal(after[key], before[key])]
    assert changed and all(key.endswith("router.weight") for key in changed)


def test_mcl_script_runs_as_two_processes(toy_clip_dir, tmp_path):
    data = save_digit_caption_folder(tmp_path / "captions", count=64)
    out = tmp_path / "mcl"
    args = ["--base", str(toy_clip_dir), "--data", str(data), "--output_dir", str(out), "--num_experts", "2"]
    args += ["--image_clusters", "2", "--text_clusters", "1", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    args += ["--feature_shard_size", "16"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run([*launcher, str(EXAMPLES / "train_clip_mcl.py"), *args, *COMMON], tmp_path)
    assert len(list((out / "features" / "stage0").glob("shard-*.safetensors"))) == 4  # both ranks wrote shards
    base, stage1 = load_file(out / "stage0" / "model.safetensors"), load_file(out / "stage1" / "model.safetensors")
    changed = [key for key in stage1 if not torch.equal(stage1[key], base[key])]
    assert changed and all(".mlp." in key for key in changed)
    assert (out / "moe" / "model.safetensors").is_file()

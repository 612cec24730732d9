"""MoIIE training under DeepSpeed on CPU: `hf-moe train-moiie` in 2 gloo processes with ZeRO-3 (the ranks
see different images and texts, so their tokens reach different experts: no rank may wait on a gather the other
skips) and ZeRO-2, each with the Trainer's own AdamW (no "optimizer" block in the configs). The loss is finite, the
saved folder loads with AutoModelForCausalLM and differs from the input in exactly the stage's parameters.

The first DeepSpeed run on a machine compiles DeepSpeed's CPU shared-memory op into TORCH_EXTENSIONS_DIR (about two
minutes, once); later runs load it from there.
"""

import ast
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_moiie_training import toy_model, toy_processor
from transformers import AutoModelForCausalLM

from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM
from hf_moe.moiie.trainer import MOE_PARAMETERS, moe_block_classes, set_moe_blocks_as_zero3_leaves


REPO = Path(__file__).resolve().parents[1]
# a hang (ranks waiting on each other's collectives) fails the test instead of blocking CI; the first run on a
# machine includes the shared-memory op's compile
RUN_TIMEOUT = 600
IMAGES = ["seven.png", "three.png", "five.png", "nine.png"]
# One sample is text-only: its process runs the vision tower and projector on a blank image (weight 0), so its
# collectives over their parameters still match the other process's.
SAMPLES = [
    {
        "id": str(i),
        "image": IMAGES[i % len(IMAGES)],
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }
    for i, (question, answer) in enumerate(
        [("what digit is this ?", "seven"), ("is this even ?", "no no"), ("what digit ?", "three"), ("yes ?", "yes")]
    )
]
SAMPLES[1] = {
    "id": "text",
    "conversations": [{"from": "human", "value": "is seven even ?"}, {"from": "gpt", "value": "no"}],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moiie_ds")
    images = root / "images"
    images.mkdir()
    for seed, name in enumerate(IMAGES):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    (root / "data.json").write_text(json.dumps(SAMPLES))
    processor = toy_processor()
    model = toy_model(processor)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(inputs: Path, output: Path, config: str, nproc: int, *extra: str) -> str:
    """Run `hf-moe train-moiie` under torchrun; return its output (every rank's log lines)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]
    # the `hf-moe` entry point (examples/moiie/train_moiie.py runs the same main) shows hf_moe's info log lines
    command += ["-m", "hf_moe.cli", "train-moiie", "--model", str(inputs / "model")]
    command += ["--data", str(inputs / "data.json")]
    command += ["--image_folder", str(inputs / "images"), "--output_dir", str(output), "--deepspeed", config]
    command += ["--max_steps", "2", "--per_device_train_batch_size", "1", "--learning_rate", "1e-2", "--use_cpu"]
    command += ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true"]
    command += list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    try:
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        printed = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout or ""
        pytest.fail(f"{config} with {nproc} processes did not finish in {RUN_TIMEOUT} s:\n{printed[-3000:]}")
    log = result.stdout + result.stderr
    # torchrun ends with its own summary; the ranks' errors come before it
    errors = "\n".join(line for line in log.splitlines() if "Error" in line or "error" in line)
    assert result.returncode == 0, f"{log[-3000:]}\n{errors[-3000:]}"
    return log


def logged_losses(log: str) -> list[float]:
    """The training losses the Trainer printed (one dict per logging step)."""
    return [float(ast.literal_eval(line)["loss"]) for line in re.findall(r"^\{'loss'.*\}$", log, re.MULTILINE)]


def changed_tensors(before: Path, after: Path) -> set[str]:
    """Names of the parameters that differ between the two folders, each loaded with AutoModelForCausalLM (a ZeRO-3
    save names the tensors in the file differently: transformers' reverse key mapping of a consolidated state dict)."""
    initial = AutoModelForCausalLM.from_pretrained(before).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(after).state_dict()
    assert initial.keys() == trained.keys()
    return {name for name in initial if not torch.equal(initial[name], trained[name])}


def test_moe_blocks_become_zero3_leaves_and_a_dense_model_has_none():
    model = toy_model(toy_processor())
    assert [cls.__name__ for cls in set_moe_blocks_as_zero3_leaves(model)] == ["MoIIESparseBlock"]
    layers = model.model.language_model.layers
    assert {i for i, layer in enumerate(layers) if getattr(layer.mlp, "_z3_leaf", False)} == {1, 3}
    assert not any(getattr(module, "_z3_leaf", False) for module in model.model.vision_tower.modules())
    # the embeddings' output requires grad even when the embeddings are frozen (see set_moe_blocks_as_zero3_leaves)
    model.requires_grad_(False)
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad

    dense = MoIIEPhi3ForCausalLM(MoIIEConfig(**{**model.config.to_dict(), "variant": "dense"}))
    assert moe_block_classes(dense) == [] and set_moe_blocks_as_zero3_leaves(dense) == []


def test_zero3_two_processes_trains_the_moe_layers_and_saves_a_full_model(inputs, tmp_path):
    output = tmp_path / "zero3"
    log = launch(inputs, output, "examples/ds_zero3.json", 2, "--stage", "finetune", "--moe_only")
    assert "ZeRO-3 leaf modules: MoIIESparseBlock" in log
    losses = logged_losses(log)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses

    assert type(AutoModelForCausalLM.from_pretrained(output)).__name__ == "MoIIEPhi3ForCausalLM"
    moe = {name for name, _ in toy_model(toy_processor()).named_parameters() if re.search(MOE_PARAMETERS, name)}
    assert moe and changed_tensors(inputs / "model", output) == moe  # every expert and router moved, nothing else


def test_zero2_two_processes_trains_the_language_model_and_projector(inputs, tmp_path):
    output = tmp_path / "zero2"
    log = launch(inputs, output, "examples/ds_zero2.json", 2, "--stage", "finetune")
    assert "Stage finetune: training" in log and "ZeRO-3 leaf modules" not in log
    losses = logged_losses(log)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses

    changed = changed_tensors(inputs / "model", output)
    assert any(re.search(MOE_PARAMETERS, name) for name in changed)
    assert any("multi_modal_projector." in name for name in changed)
    assert all(re.match(r"model\.(multi_modal_projector|language_model)\.|lm_head\.", name) for name in changed)

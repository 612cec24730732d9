"""`hf-moe train-moiie`: three steps through the CLI, the saved folder loads with AutoModelForCausalLM and differs
from the input only in the stage's parameters, a finished job is left untouched, a changed re-run is refused."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_moiie_training import SAMPLES, toy_model, toy_processor
from transformers import AutoModelForCausalLM

from hf_moe.cli import main


@pytest.fixture
def inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(["seven.png", "three.png"]):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    (tmp_path / "data.json").write_text(json.dumps(SAMPLES * 2))
    processor = toy_processor()
    model = toy_model(processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path


def weights(folder) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(file))
    return state


def run(inputs, *extra):
    argv = ["train-moiie", "--model", str(inputs / "model"), "--data", str(inputs / "data.json")]
    argv += ["--image_folder", str(inputs / "images"), "--output_dir", str(inputs / "out")]
    argv += ["--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2"]
    argv += ["--save_steps", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", *extra]
    return main(argv)


def test_train_moiie_pretrain_trains_the_projector_only_and_reruns_are_safe(inputs, capsys):
    assert run(inputs, "--stage", "pretrain") == 0
    out = inputs / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MoIIEPhi3ForCausalLM"
    assert (out / "README.md").is_file() and (out / "hf_moe_job.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    before, after = weights(inputs / "model"), weights(out)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("multi_modal_projector." in name for name in changed)

    # a re-run of the finished job changes nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run(inputs, "--stage", "pretrain") == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # another stage is refused, naming the option
    assert run(inputs, "--stage", "finetune") == 1
    assert "--stage: 'pretrain' (recorded) vs 'finetune' (now)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

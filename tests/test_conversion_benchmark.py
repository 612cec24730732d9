"""Smoke test of benchmarks/conversion.py at the tiny shape: the streamed safetensors / `.pt` files read back as
written, the generated checkpoints load without missing keys and differ from their base only where their method
trains, the measurement sees a process's memory (and kills one above `--max_rss_gb`), one converter runs through
`main` into a JSON report with every field, and the planned input sizes at the real shapes are the released
files'. No timing assertions."""

import contextlib
import io
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import script_fixture


bench = script_fixture("benchmarks/conversion.py", "conversion_benchmark")


def test_streamed_files_read_back_as_written(bench, tmp_path):
    entries = [
        ("a.weight", (3, 5), torch.float32),
        ("b.weight", (4, 2), torch.bfloat16),
        ("logit_scale", (), torch.float32),
        ("c.norm.weight", (7,), torch.float16),
    ]
    shapes = {name: shape for name, shape, _ in entries}

    def value(name):
        return bench.random_tensor(name, shapes[name])

    expected = {name: value(name).to(dtype) for name, _, dtype in entries}
    assert expected["logit_scale"].item() == pytest.approx(2.6593, abs=1e-4)
    assert (expected["c.norm.weight"] - 1).abs().max() < 0.2  # norm weights around 1

    bench.write_safetensors_shards(tmp_path, entries, value, max_shard_bytes=64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes) and len(set(index["weight_map"].values())) > 1
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / shard))
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name

    bench.write_torch_state_dict(tmp_path / "state.pt", entries, value)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_generated_checkpoints_load_and_differ_only_where_trained(bench, tmp_path):
    from transformers import CLIPModel, CLIPVisionModel

    setting = bench.Setting(bench.SHAPES["tiny"], 1, "auto")
    for name in ("clip_b32", "clip_b32_tasks", "clip_l14", "clip_l14_mcl", "clip_moe_original"):
        bench.ensure_input(tmp_path, name, bench.INPUTS[name](setting))
    inputs = tmp_path / "inputs"
    base, info = CLIPModel.from_pretrained(inputs / "clip_b32", output_loading_info=True)
    assert not any(info.values()) and base.config.vision_config.num_hidden_layers == 1
    task, info = CLIPVisionModel.from_pretrained(inputs / "clip_b32_tasks" / "task3", output_loading_info=True)
    assert not any(info.values())
    base_vision = base.vision_model.state_dict()
    deltas = [(task.state_dict()[key] - tensor).abs().max().item() for key, tensor in base_vision.items()]
    assert 0 < min(deltas) and max(deltas) < 0.02  # every vision tensor fine-tuned, by a small delta

    l14 = CLIPModel.from_pretrained(inputs / "clip_l14").state_dict()
    stage = CLIPModel.from_pretrained(inputs / "clip_l14_mcl" / "stage2").state_dict()
    changed = {key for key, tensor in l14.items() if not torch.equal(tensor, stage[key])}
    assert changed == {key for key in l14 if ".mlp." in key}  # MCL stages differ in the MLPs of both towers only

    original = torch.load(inputs / "clip_moe_original" / "clip-moe-4-2.pt", weights_only=True)
    prefix = "transformer.resblocks.0"
    assert original[f"{prefix}.gate.weight"].shape == (4, 32)
    assert torch.equal(original[f"{prefix}.experts.0.c_fc.weight"], l14["text_model.encoder.layers.0.mlp.fc1.weight"])
    assert not torch.equal(original[f"{prefix}.experts.2.c_fc.weight"], original[f"{prefix}.experts.0.c_fc.weight"])
    assert torch.equal(
        original[f"{prefix}.attn.in_proj_weight"][:32], l14["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    )
    assert original["positional_embedding_res"].shape == (248, 32)
    # Cached: a second call writes nothing.
    assert bench.ensure_input(tmp_path, "clip_b32", bench.INPUTS["clip_b32"](setting)) is None


def test_measurement_sees_the_process_memory_and_reports_failures(bench, tmp_path):
    allocate = "x = b'x' * (256 * 2**20); print(len(x))"  # 256 MiB written, so resident
    result = bench.run_measured([sys.executable, "-c", allocate], tmp_path / "ok.log")
    assert result["returncode"] == 0 and "error" not in result and result["wall_s"] > 0
    assert result["peak_rss_bytes"] > 256 * 2**20 and result["peak_rss_polled_bytes"] > 0
    failed = bench.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "failed.log")
    assert failed["returncode"] == 3 and failed["error"].startswith("exit status 3")
    # A process above the limit is killed at once (it would otherwise sleep for a minute).
    stays = "import time; x = b'x' * (256 * 2**20); time.sleep(60)"
    killed = bench.run_measured([sys.executable, "-c", stays], tmp_path / "killed.log", max_rss_bytes=128 * 2**20)
    assert killed["error"] == "killed by the benchmark: resident set above --max_rss_gb 0.134218"
    assert killed["returncode"] != 0 and killed["wall_s"] < 30


def test_main_runs_a_converter_and_reports_every_field(bench, tmp_path):
    output = tmp_path / "report.json"
    argv = ["--shape", "tiny", "--layers", "1", "--cases", "merge_b32_8", "--work_dir", str(tmp_path / "work")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main([*argv, "--output", str(output), "--skip_baseline", "--delete_inputs"])
    report = json.loads(stdout.getvalue())
    assert report == json.loads(output.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] == torch.__version__
    assert report["shape"] == {"name": "tiny", "layers": 1, "dtype": "auto"}
    result = report["cases"]["merge_b32_8"]
    assert "error" not in result, result
    assert result["command"].startswith("hf-moe merge --method task_arithmetic ")
    assert result["returncode"] == 0 and result["wall_s"] > 0
    assert result["output_bytes"] > 0 and result["output_weight_files"] == ["model.safetensors"]
    assert result["input_bytes"] > result["output_bytes"]  # 9 towers in, 1 CLIP out
    assert result["peak_rss_bytes"] > 0 and result["peak_rss_anon_polled_bytes"] >= 0
    assert result["peak_over_output"] == pytest.approx(result["peak_rss_bytes"] / result["output_bytes"], rel=1e-2)
    assert set(report["goals"]) == {"peak_over_output <= 1.25", "met"}
    work = tmp_path / "work" / "tiny-L1-auto"
    assert not (work / "outputs" / "merge_b32_8").exists()  # outputs deleted
    assert (work / "outputs" / "merge_b32_8.log").is_file()
    assert not (work / "inputs" / "clip_b32").exists() and not (work / "inputs" / "clip_b32_tasks").exists()


def test_plan_gives_the_released_sizes_at_the_real_shapes(bench):
    setting = bench.Setting(bench.SHAPES["real"], None, "auto")
    sizes = {name: sum(bench.nbytes(a.entries) for a in bench.INPUTS[name](setting)) for name in (
        "clip_l14", "clip_moe_original", "clip_b32", "phi3_mini", "siglip_so400m", "simcse_bert"
    )}  # fmt: skip
    released = {  # the weight files on the Hub, in GB
        "clip_l14": 1.71,
        "clip_moe_original": 4.81,
        "clip_b32": 0.605,
        "phi3_mini": 7.64,
        "siglip_so400m": 3.51,
        "simcse_bert": 0.438,
    }
    for name, gigabytes in released.items():
        assert sizes[name] / 1e9 == pytest.approx(gigabytes, rel=0.01), name


def test_markdown_table_names_each_converter_without_paths(bench):
    results = {
        "ties_b32_8": {
            "command": "hf-moe merge --method ties /w/b32 /w/t1 /w/t2 --output_dir /w/out",
            "input_bytes": 3e9, "output_bytes": 1e9, "peak_rss_bytes": 1.2e9, "peak_over_output": 1.2, "wall_s": 12.3,
        },
        "moiie_phi3_siglip": {"command": "hf-moe upcycle-moiie --llm /w/p --vision /w/s", "input_bytes": 2e9,
                              "error": "exit status -9"},
    }  # fmt: skip
    table = bench.markdown_table(results).splitlines()
    assert table[2] == "| ties_b32_8 | `hf-moe merge --method ties` | 3.00 | 1.00 | 1.20 | 1.20 | 12 |"
    assert table[3] == "| moiie_phi3_siglip | `hf-moe upcycle-moiie` | 2.00 | failed | | | |"
    assert bench.goals(results) == {
        "peak_over_output <= 1.25": {"ties_b32_8": 1.2, "moiie_phi3_siglip": None},
        "met": False,
    }


def test_every_fine_tune_has_its_own_delta(bench):
    """torch's CPU generator keeps the low 32 bits of a seed: seeds differing above them gave identical fine-tunes."""
    tuned = [bench.tuned_tensor("w", (64,), torch.float32, task, lambda name: True) for task in (1, 2, 3)]
    base = bench.random_tensor("w", (64,))
    deltas = [tensor - base for tensor in tuned]
    assert all(delta.abs().max() > 0 for delta in deltas)
    assert not torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[1], deltas[2])

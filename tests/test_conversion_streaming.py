"""The streaming converters (upcycle-clip, convert-clip-moe-original, upcycle-moiie): every written tensor is, bit for
bit, what building the whole model in memory gives (the converters' former implementation, kept here as the
reference); sharded output with an index loads as the unsharded one; bf16 stays bf16; `--dtype` casts; and peak memory
stays below 1.25x the written folder in a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, LlavaForConditionalGeneration, Phi3Config, Phi3ForCausalLM

from hf_moe.cli import main
from hf_moe.conversion import convert_clip_moe_original, upcycle_clip, upcycle_moiie
from hf_moe.modeling import CLIPMoEConfig, CLIPMoEModel, MoIIEConfig, MoIIEPhi3ForCausalLM, stretch_text_positions
from hf_moe.toy import toy_clip_config

from moiie_dense import IMAGE_TOKEN, save_dense_parts


def written(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, sharded or not."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_bit_identical(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)), name


DENSE_MLP = {
    "up_proj": "fc1.weight",
    "up_proj_bias": "fc1.bias",
    "down_proj": "fc2.weight",
    "down_proj_bias": "fc2.bias",
}


def in_memory_upcycle_clip(bases, folder, seed) -> dict[str, torch.Tensor]:
    """upcycle_clip as it was before streaming: the dense models and an fp32 CLIP-MoE built whole under `seed`, the
    dense weights loaded into it, cast to the bases' dtype, its state dict taken."""
    dense = [CLIPModel.from_pretrained(base) for base in bases]
    config = CLIPMoEConfig.from_pretrained(folder)
    experts = dense if len(dense) > 1 else dense * config.num_local_experts
    torch.manual_seed(seed)
    model = CLIPMoEModel(config)
    state = {}
    for name in model.state_dict():
        prefix, _, param = name.rpartition(".mlp.experts.")
        if prefix:
            state[name] = torch.stack([d.state_dict()[f"{prefix}.mlp.{DENSE_MLP[param]}"] for d in experts])
        elif not name.endswith("router.weight"):
            state[name] = dense[0].state_dict()[name]
    positions = "text_model.embeddings.position_embedding.weight"
    if state[positions].shape[0] != config.text_config.max_position_embeddings:
        state[positions] = stretch_text_positions(state[positions])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert all(key.endswith("router.weight") for key in missing) and not unexpected
    return model.to(dense[0].dtype).state_dict()


@pytest.fixture(scope="module")
def clip_bases(toy_clip_dir, tmp_path_factory):
    """The toy CLIP, two MLP-only variants of it (MCL stages) and a bf16 copy."""
    root = tmp_path_factory.mktemp("bases")
    stages = [toy_clip_dir]
    for seed in (1, 2):
        model = CLIPModel.from_pretrained(toy_clip_dir)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".mlp." in name:
                    parameter.add_(torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / f"stage{seed}")
        stages.append(root / f"stage{seed}")
    CLIPModel.from_pretrained(toy_clip_dir).to(torch.bfloat16).save_pretrained(root / "bf16")
    return stages, root / "bf16"


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("sparse_long_text_some_layers", dict(num_experts=2, top_k=1, seed=3, long_text=True, text_moe_layers=1)),
        ("multiplet", dict(top_k=2, seed=1)),
        ("bf16", dict(num_experts=3, top_k=2, seed=5)),
    ],
)
def test_upcycle_clip_writes_what_the_in_memory_build_gives(clip_bases, tmp_path, case, kwargs):
    stages, bf16 = clip_bases
    bases = stages if case == "multiplet" else [bf16] if case == "bf16" else stages[:1]
    upcycle_clip(bases, tmp_path / "out", return_model=False, **kwargs)
    got = written(tmp_path / "out")
    assert_bit_identical(got, in_memory_upcycle_clip(bases, tmp_path / "out", kwargs["seed"]))
    if case == "bf16":  # bf16 in, bf16 out, with no fp32 tensor anywhere
        assert {t.dtype for t in got.values()} == {torch.bfloat16}
        assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_streamed_release_conversion_is_the_release_bit_for_bit(toy_clip_dir, tmp_path):
    """With experts copied from the dense MLP, every converted tensor is a dense tensor (or a stack of it), exactly."""
    from test_convert_clip_moe_original import openai_naming

    dense = CLIPModel.from_pretrained(toy_clip_dir)
    original = openai_naming(dense, num_experts=3, moe_layers=1, expert_noise=0.0, long_text=False)
    torch.save(original, tmp_path / "r.pt")
    convert_clip_moe_original(tmp_path / "r.pt", toy_clip_dir, tmp_path / "out", return_model=False)
    got, expected = written(tmp_path / "out"), {}
    config = CLIPMoEConfig.from_pretrained(tmp_path / "out")
    for name in CLIPMoEModel(config).state_dict():
        prefix, _, param = name.rpartition(".mlp.experts.")
        if prefix:
            expected[name] = torch.stack([dense.state_dict()[f"{prefix}.mlp.{DENSE_MLP[param]}"]] * 3)
        elif name.endswith("router.weight"):
            layer = name.split(".")[3]
            tower = "visual.transformer" if name.startswith("vision") else "transformer"
            expected[name] = original[f"{tower}.resblocks.{layer}.gate.weight"]
        else:
            expected[name] = dense.state_dict()[name]
    assert_bit_identical(got, expected)


@pytest.fixture(scope="module")
def moiie_parts(tmp_path_factory):
    from test_upcycle_moiie import TEXT

    root = tmp_path_factory.mktemp("moiie")
    llava = save_dense_parts(root, TEXT, Phi3ForCausalLM, "phi3")
    return root, llava


@pytest.mark.parametrize("source", ["parts_random_projector", "llava"])
def test_upcycle_moiie_writes_what_the_in_memory_build_gives(moiie_parts, tmp_path, source):
    root, _ = moiie_parts
    if source == "llava":
        upcycle_moiie(root / "llava", None, tmp_path / "out", seed=4, return_model=False)
    else:
        upcycle_moiie(root / "phi3", root / "siglip", tmp_path / "out", image_token_id=IMAGE_TOKEN, seed=4)
    llava = LlavaForConditionalGeneration.from_pretrained(root / "llava")
    config = MoIIEConfig.from_pretrained(tmp_path / "out")
    torch.manual_seed(4)  # the former implementation: the whole MoIIE built under the seed, dense weights loaded
    model = MoIIEPhi3ForCausalLM(config)
    dense, state = llava.state_dict(), {}
    for name in model.state_dict():
        prefix, _, param = name.rpartition(".mlp.experts.")
        if prefix:
            state[name] = dense[f"{prefix}.mlp.{param}.weight"].expand(config.num_local_experts, -1, -1)
        elif name in dense and not (source != "llava" and "multi_modal_projector" in name):
            state[name] = dense[name]
    model.load_state_dict(state, strict=False)
    assert_bit_identical(written(tmp_path / "out"), model.state_dict())


def test_a_full_siglip_gives_its_vision_tower(moiie_parts, tmp_path):
    """A `SiglipModel` (as google/siglip-so400m-patch14-384) upcycles as its vision tower alone would."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    root, _ = moiie_parts
    tower = SiglipVisionModel.from_pretrained(root / "siglip")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    full = SiglipModel(SiglipConfig(vision_config=tower.config.to_dict(), text_config=text))
    full.vision_model.load_state_dict(tower.state_dict())
    full.save_pretrained(tmp_path / "siglip_full")
    kwargs = dict(image_token_id=IMAGE_TOKEN, seed=2, return_model=False)
    upcycle_moiie(root / "phi3", root / "siglip", tmp_path / "tower", **kwargs)
    upcycle_moiie(root / "phi3", tmp_path / "siglip_full", tmp_path / "full", **kwargs)
    assert_bit_identical(written(tmp_path / "full"), written(tmp_path / "tower"))


def test_sharded_output_has_an_index_and_loads_as_the_unsharded(clip_bases, tmp_path):
    stages, _ = clip_bases
    upcycle_clip(stages, tmp_path / "whole", top_k=2, return_model=False)
    model = upcycle_clip(stages, tmp_path / "sharded", top_k=2, max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    assert sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors")) == files
    whole = CLIPMoEModel.from_pretrained(tmp_path / "whole").state_dict()
    assert_bit_identical(model.state_dict(), whole)
    assert_bit_identical(written(tmp_path / "sharded"), written(tmp_path / "whole"))


def test_dtype_option_casts_the_written_weights(toy_clip_dir, tmp_path):
    dtype = "float16"
    common = ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--seed", "1"]
    assert main([*common, "--output_dir", str(tmp_path / "auto")]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "cast"), "--dtype", dtype]) == 0
    auto, cast = written(tmp_path / "auto"), written(tmp_path / "cast")
    assert {t.dtype for t in auto.values()} == {torch.float32}  # the base's dtype by default
    assert_bit_identical(cast, {name: tensor.to(getattr(torch, dtype)) for name, tensor in auto.items()})
    assert json.loads((tmp_path / "cast" / "config.json").read_text())["dtype"] == dtype
    assert f"--dtype {dtype}" in (tmp_path / "cast" / "README.md").read_text()


def test_unknown_dtype_is_refused_before_any_work(toy_clip_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16; got 'int8'"):
        upcycle_clip(toy_clip_dir, tmp_path / "out", num_experts=2, dtype="int8")
    assert not (tmp_path / "out").exists()


MEMORY_SCRIPT = """
import json, sys
from hf_moe.cli import main

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024

warm_up, *runs = [json.loads(arg) for arg in sys.argv[1:]]
main(warm_up)  # a tiny conversion first: every lazily imported module is loaded before the baseline
results = []
for argv, output in runs:
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident size (VmHWM)
    baseline = kib("VmRSS:")
    assert main(argv) == 0
    results.append(kib("VmHWM:") - baseline)
print(json.dumps(results))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_stays_below_the_written_size(toy_clip_dir, moiie_parts, tmp_path):
    """bf16 bases of a few hundred MB: the peak resident memory of each conversion, above the process's baseline,
    stays under 1.25x the folder written (building the MoE whole in fp32 beside the dense model took over 3x)."""
    from test_upcycle_moiie import TEXT

    torch.manual_seed(0)
    CLIPModel(toy_clip_config(hidden_size=768, num_layers=3)).to(torch.bfloat16).save_pretrained(tmp_path / "clip_bf16")
    wide = dict(TEXT, hidden_size=512, intermediate_size=4096, num_attention_heads=8, vocab_size=32064)
    Phi3ForCausalLM(Phi3Config(**wide)).to(torch.bfloat16).save_pretrained(tmp_path / "phi3")
    siglip = moiie_parts[0] / "siglip"
    runs = [
        (
            ["upcycle-clip", str(tmp_path / "clip_bf16"), "--num_experts", "4", "--output_dir", str(tmp_path / "o1")],
            "o1",
        ),
        (
            ["upcycle-moiie", "--llm", str(tmp_path / "phi3"), "--vision", str(siglip)]
            + ["--num_shared_experts", "2", "--output_dir", str(tmp_path / "o2")],
            "o2",
        ),
    ]
    warm_up = ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--output_dir", str(tmp_path / "warm")]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), json.dumps(warm_up), *map(json.dumps, runs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    for (_, output), peak in zip(runs, peaks):
        folder = tmp_path / output
        size = sum(path.stat().st_size for path in folder.iterdir())
        assert 150e6 < size < 400e6, size  # a moderate shape, where a fixed overhead does not hide a copy
        tensors = written(folder)
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}, output
        print(f"{output}: peak {peak / 1e6:.0f} MB above baseline, folder {size / 1e6:.0f} MB")
        assert peak < 1.25 * size, f"{output}: peak {peak / 1e6:.0f} MB above baseline for a {size / 1e6:.0f} MB folder"

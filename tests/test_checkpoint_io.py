"""hf_moe.checkpoint_io: lazy reading, streamed safetensors writing, and meta-device builds whose parameters are
bit-identical to a CPU build under the same seed."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, LlamaConfig, LlamaForCausalLM

from hf_moe.checkpoint_io import (
    LazyCheckpoint,
    StreamedModel,
    build_on_meta,
    planned_state_dict,
    write_safetensors_file,
    write_safetensors_shards,
)
from hf_moe.conversion.upcycle_clip import clip_moe_config_from_dense
from hf_moe.modeling import CLIPMoEModel, MoIIEConfig, MoIIELlamaForCausalLM, MoIIEPhi3ForCausalLM
from hf_moe.toy import toy_clip_config


TENSORS = {
    "w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
    "half": torch.arange(5, dtype=torch.bfloat16) / 3,
    "scalar": torch.tensor(2.5),
    "ids": torch.arange(7),
    "empty": torch.empty(0, 3),
    "mask": torch.tensor([True, False]),
}


def test_written_file_is_what_safetensors_reads_back(tmp_path):
    specs = {name: tensor.to("meta") for name, tensor in TENSORS.items()}
    produced = []
    write_safetensors_file(tmp_path / "x.safetensors", specs, lambda n: produced.append(n) or TENSORS[n], {"k": "v"})
    assert sorted(produced) == sorted(TENSORS)  # once each
    raw = (tmp_path / "x.safetensors").read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert (8 + header_size) % 8 == 0
    for name, entry in json.loads(raw[8 : 8 + header_size]).items():
        if name != "__metadata__":  # each tensor aligned to its element size, as safetensors writes them
            assert entry["data_offsets"][0] % TENSORS[name].element_size() == 0, name
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_wrong_produced_shape_or_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"w: produced \(3, 4\) torch.float16, planned \(3, 4\) torch.float32"):
        write_safetensors_file(tmp_path / "x.safetensors", {"w": TENSORS["w"]}, lambda n: TENSORS[n].half())


@pytest.mark.parametrize("kind", ["safetensors", "pickle", "legacy_pickle"])
def test_lazy_checkpoint_reads_each_tensor_on_its_own(tmp_path, kind):
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(TENSORS, path)
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": TENSORS}, path, _use_new_zipfile_serialization=kind == "pickle")
    with LazyCheckpoint(path, max_mapped_bytes=16) as checkpoint:  # re-opened every few tensors
        assert checkpoint.names() == list(TENSORS) or set(checkpoint.names()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            assert checkpoint.shape(name) == tensor.shape and checkpoint.dtype(name) == tensor.dtype
            got = checkpoint.get(name)
            assert torch.equal(got, tensor) and got.is_contiguous()
            got.zero_()  # its own memory: the checkpoint is unchanged
            assert torch.equal(checkpoint.get(name), tensor)
        with pytest.raises(KeyError, match="has no tensor 'nope'"):
            checkpoint.get("nope")


def test_lazy_checkpoint_names_a_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(TENSORS, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(OSError, match="is truncated"):
        LazyCheckpoint(path)


def test_shards_and_index_load_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    dense = LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "whole")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    with LazyCheckpoint(tmp_path / "whole") as source:
        StreamedModel(meta, source.get, max_shard_size="20KB").save_pretrained(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert index["metadata"]["total_parameters"] == dense.num_parameters()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "sharded")
    for name, tensor in dense.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with LazyCheckpoint(tmp_path / "sharded") as sharded:  # the reader follows the index
        assert set(sharded.names()) == set(planned_state_dict(meta))


def test_unsharded_index_free_output(tmp_path):
    specs = {name: tensor.to("meta") for name, tensor in TENSORS.items()}
    assert write_safetensors_shards(tmp_path, specs, TENSORS.__getitem__) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    vocab_size=100,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CLIPMoEModel(clip_moe_config_from_dense(toy_clip_config(), num_local_experts=3, num_experts_per_tok=2)),
        lambda: MoIIEPhi3ForCausalLM(MoIIEConfig(vision_config=VISION, text_config={**TEXT, "model_type": "phi3"})),
        lambda: MoIIELlamaForCausalLM(
            MoIIEConfig(vision_config=VISION, text_config={**TEXT, "model_type": "llama", "tie_word_embeddings": True})
        ),
    ],
    ids=["clip_moe", "moiie_phi3", "moiie_llama_tied"],
)
def test_meta_build_gives_the_cpu_builds_values_and_rng(build):
    """Every parameter a CPU build initialises (SigLIP's rejection-sampled truncated normals included) is
    re-created bit for bit, and the RNG ends where the CPU build leaves it."""
    torch.manual_seed(7)
    cpu = build()
    cpu_rng = torch.get_rng_state()
    torch.manual_seed(7)
    meta, initial_value = build_on_meta(build)
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert all(p.device.type == "meta" for p in meta.parameters())
    checked = 0
    for name, tensor in cpu.state_dict().items():
        # CLIP-MoE's `_init_weights` initialises logit_scale too (transformers' CLIP only sets it in __init__).
        assert torch.equal(initial_value(name), tensor), name
        checked += 1
    assert checked > 50
    assert torch.equal(torch.get_rng_state(), cpu_rng)  # re-creating values leaves the RNG alone


def test_planned_state_dict_is_what_save_pretrained_writes(tmp_path):
    model = MoIIELlamaForCausalLM(
        MoIIEConfig(vision_config=VISION, text_config={**TEXT, "model_type": "llama", "tie_word_embeddings": True})
    )
    model.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    with torch.device("meta"):
        meta = MoIIELlamaForCausalLM(model.config)
    plan = planned_state_dict(meta)
    assert plan.keys() == written.keys()
    assert all(plan[k].shape == written[k].shape and plan[k].dtype == written[k].dtype for k in plan)


def test_streamed_clip_equals_save_pretrained(toy_clip_dir, tmp_path):
    """config.json and weights as `save_pretrained` writes them (here for a dense CLIP read back lazily)."""
    dense = CLIPModel.from_pretrained(toy_clip_dir)
    dense.save_pretrained(tmp_path / "reference")
    with torch.device("meta"):
        meta = CLIPModel(dense.config)
    with LazyCheckpoint(toy_clip_dir) as source:
        StreamedModel(meta, source.get).save_pretrained(tmp_path / "streamed")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (tmp_path / "reference" / "config.json").read_text()
    )
    reference, streamed = (load_file(tmp_path / d / "model.safetensors") for d in ("reference", "streamed"))
    assert reference.keys() == streamed.keys()
    assert all(torch.equal(reference[k], streamed[k]) for k in reference)

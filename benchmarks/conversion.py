# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Wall time and peak resident memory of every hf-moe converter against the size of the folder it writes, at the
papers' real shapes, on random weights saved locally in the released configs.

Cases (`--cases`, default all):

* `clip_l14_sparse`: `hf-moe upcycle-clip` of one CLIP ViT-L/14 (openai/clip-vit-large-patch14), 4 experts, top-2;
* `clip_l14_multiplet`: `hf-moe upcycle-clip` of 4 ViT-L/14 bases that share every non-MLP weight and differ in the
  MLPs of both towers (MCL's stage checkpoints: stage 0 is the base itself);
* `clip_l14_original`: `hf-moe convert-clip-moe-original` of an official-format release file (a raw pickled fp32
  state dict in OpenAI-CLIP naming, 4 experts and a gate in all 24 + 12 blocks, Long-CLIP's 248 split text
  positions, as `clip-moe-4-2-sharegpt4v.pt`), `--base` the ViT-L/14 folder;
* `wemoe_b32_8` / `ewemoe_b32_8`: `hf-moe merge-wemoe` of openai/clip-vit-base-patch32 and 8 vision-only fine-tunes
  (`CLIPVisionModel` folders, as tanganke/clip-vit-base-patch32_<task>), WEMoE defaults / E-WEMoE
  (`--shared_router --prune_ratio 0.9`); `wemoe_l14_8` the same with ViT-L/14;
* `merge_b32_8` / `ties_b32_8`: `hf-moe merge --method task_arithmetic` / `ties` of the same 8 B/32 fine-tunes;
* `moiie_phi3_siglip`: `hf-moe upcycle-moiie` of Phi-3-mini-4k-instruct (bf16, its tokenizer's 32011 tokens, no
  `<image>`) + SigLIP-so400m-patch14-384 (the whole `SiglipModel`, fp32, as released), MoIIE defaults;
* `mode_b32_4`: `hf-moe mode build` of 4 CLIP ViT-B/32 data experts, 1024 fine caption clusters of a SimCSE
  BERT-base clustering encoder (`pooler` pooling).

Inputs are generated once into `--work_dir` (one folder per shape, depth and dtype) and reused. Generation is
memory-light: names and shapes come from the model built on the meta device, and every tensor is drawn on its own
(normal, std 0.02; norm weights 1 + that; CLIP's logit scale ln(1/0.07)) from a generator seeded by its name, then
streamed into safetensors shards (5 GB, with an index, as Hub releases are) or into the zip entries of the `.pt`,
one tensor in memory at a time. A fine-tune or an MCL stage is the base plus a seeded delta (std 0.002) on the
tensors its method trains (the whole vision tower; the MLPs), so it never needs the base in memory. Every
checkpoint is in its released dtype (`--dtype auto`: CLIP, SigLIP and BERT fp32, Phi-3 bf16) unless `--dtype` says
otherwise.

Measurement: each converter runs as its console command (`hf-moe ...`) in a fresh process, offline, under
`/usr/bin/time -v`: `peak_rss_bytes` is the kernel's peak resident set size of the converter process ("Maximum
resident set size"). This script also polls the process tree every 50 ms for the summed resident size and its
anonymous part (`RssAnon`): a converter that memory-maps its inputs has their file pages in its resident set, which
the kernel can drop under pressure, while anonymous pages it cannot. `output_bytes` is the size of the weight files
the converter wrote (`*.safetensors`, `*.bin`, `*.pt`); `peak_over_output` the ratio the issue bounds by 1.25.
`interpreter_baseline` is the same measurement of `python -c "import torch, transformers, hf_moe.conversion"`,
which every converter pays. Inputs sit in the page cache when measured (they were just written or read). Outputs
are deleted after each case unless `--keep_outputs`.

One JSON object goes to stdout (and to `--output`), progress to stderr:

    python benchmarks/conversion.py --layers 2                    # every case at real widths, 2 blocks per tower
    python benchmarks/conversion.py --plan                        # input sizes per case; nothing written or run
    python benchmarks/conversion.py --max_rss_gb 22 --delete_inputs --output benchmarks/results/conversion_cpu.json

The last is the papers' shapes: 39 GB of inputs in all, at most about 27 GB of disk at a time with
`--delete_inputs` (MoIIE: 11 GB in, 16 GB out); `--max_rss_gb` kills a converter that would exhaust the machine.
"""

import argparse
import collections
import contextlib
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers


# This script's folder is on sys.path when it runs as a script, not when a test loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import device_name, log, write_report  # noqa: E402


SEED = 0
WEIGHT_STD = 0.02
DELTA_STD = 0.002  # a fine-tune's or MCL stage's change: a tenth of a weight's spread
MAX_SHARD_BYTES = 5 * 10**9
POLL_S = 0.05
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
COMPLETE = ".complete"
TIME_BIN = "/usr/bin/time"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
STORAGE_TYPES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage"}
NUM_TASKS = 8  # WEMoE / merging fine-tunes
NUM_CLIP_MOE_EXPERTS = 4
NUM_MODE_EXPERTS = 4
LONG_CLIP_POSITIONS = 248


# ----------------------------------------------------------------------------------------------------------
# Shapes: the released config.json values (and a tiny stand-in for the smoke test)
# ----------------------------------------------------------------------------------------------------------

CLIP_L14 = {  # openai/clip-vit-large-patch14
    "text_config": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    ),
    "vision_config": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, hidden_act="quick_gelu", projection_dim=768,
    ),
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
}  # fmt: skip
CLIP_B32 = {  # openai/clip-vit-base-patch32
    "text_config": dict(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=512, bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    ),
    "vision_config": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32, hidden_act="quick_gelu", projection_dim=512,
    ),
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
}  # fmt: skip
PHI3_MINI = dict(  # microsoft/Phi-3-mini-4k-instruct
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0, sliding_window=2047, hidden_act="silu", bos_token_id=1, eos_token_id=32000,
    pad_token_id=32000, tie_word_embeddings=False, attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
)  # fmt: skip
SIGLIP_SO400M = {  # google/siglip-so400m-patch14-384 (SiglipModel: both towers)
    "text_config": dict(
        vocab_size=32000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        max_position_embeddings=64,
    ),
    "vision_config": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14,
    ),
}  # fmt: skip
SIMCSE_BERT = dict(  # princeton-nlp/sup-simcse-bert-base-uncased (bert-base-uncased)
    vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, type_vocab_size=2,
)  # fmt: skip


def _tiny_clip(text_hidden, vision_hidden):
    return {
        "text_config": dict(CLIP_B32["text_config"], vocab_size=600, hidden_size=text_hidden,
                            intermediate_size=4 * text_hidden, num_hidden_layers=2, num_attention_heads=2),
        "vision_config": dict(CLIP_B32["vision_config"], hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        "projection_dim": 32,
        "logit_scale_init_value": 2.6592,
    }  # fmt: skip


SHAPES = {
    "real": {
        "clip_l14": CLIP_L14, "clip_b32": CLIP_B32, "phi3_mini": PHI3_MINI, "siglip_so400m": SIGLIP_SO400M,
        "simcse_bert": SIMCSE_BERT, "phi3_base_vocab": 32000, "mode_fine_clusters": 1024,
    },
    "tiny": {
        "clip_l14": _tiny_clip(32, 48), "clip_b32": _tiny_clip(32, 32),
        "phi3_mini": dict(PHI3_MINI, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, sliding_window=63, eos_token_id=100,
                          pad_token_id=100),
        "siglip_so400m": {
            "text_config": dict(SIGLIP_SO400M["text_config"], vocab_size=100, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2),
            "vision_config": dict(SIGLIP_SO400M["vision_config"], hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, image_size=28),
        },
        "simcse_bert": dict(SIMCSE_BERT, vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=80),
        "phi3_base_vocab": 100, "mode_fine_clusters": 16,
    },
}  # fmt: skip
# The dtype each checkpoint is released in (`--dtype auto`).
RELEASED_DTYPES = {
    "clip_l14": torch.float32,
    "clip_b32": torch.float32,
    "phi3_mini": torch.bfloat16,
    "siglip_so400m": torch.float32,
    "simcse_bert": torch.float32,
}


def with_layers(fields: dict, layers: int | None) -> dict:
    """`fields` (a config's keyword arguments) with `num_hidden_layers` of every tower set to `layers`."""
    if layers is None:
        return fields
    out = {}
    for key, value in fields.items():
        out[key] = with_layers(value, layers) if isinstance(value, dict) else value
    if "num_hidden_layers" in out:
        out["num_hidden_layers"] = layers
    return out


# ----------------------------------------------------------------------------------------------------------
# Random weights, one tensor at a time
# ----------------------------------------------------------------------------------------------------------


def _seed(name: str, seed: int) -> int:
    # One 32-bit value from both: torch's CPU generator keeps only the low 32 bits of a seed, so `seed << 32` (the
    # earlier mix) gave every fine-tune the same delta.
    return zlib.crc32(f"{name}\0{seed}".encode())


def random_tensor(name: str, shape, dtype: torch.dtype = torch.float32, seed: int = SEED) -> torch.Tensor:
    """The base value of the tensor `name` (fp32, or zeros for integer buffers), the same in every checkpoint that
    has it: normal(0, 0.02); 1 + that for norm weights; ln(1/0.07) for CLIP's logit scale."""
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name, seed))).mul_(WEIGHT_STD)
    if name.endswith("logit_scale"):
        return tensor.fill_(math.log(1 / 0.07))
    if "norm" in name.lower() and name.endswith("weight"):
        tensor.add_(1.0)
    return tensor


def tuned_tensor(name: str, shape, dtype: torch.dtype, task: int, tuned: Callable[[str], bool]) -> torch.Tensor:
    """The base value plus, where `tuned(name)`, the seeded delta of fine-tune / stage `task` (>= 1)."""
    tensor = random_tensor(name, shape, dtype)
    if tuned(name) and dtype.is_floating_point:
        generator = torch.Generator().manual_seed(_seed(name, 1000 + task))
        tensor.add_(torch.randn(shape, generator=generator).mul_(DELTA_STD))
    return tensor


def tensor_specs(model_class, config) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of `model_class(config)`'s state dict, built on the meta device."""
    with torch.device("meta"):
        model = model_class(config)
    return [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()]


def cast_entries(entries, dtype: torch.dtype):
    """`entries` with every floating-point tensor in `dtype` (integer buffers keep theirs)."""
    return [(name, shape, dtype if old.is_floating_point else old) for name, shape, old in entries]


def nbytes(entries) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in entries)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, entries, value: Callable[[str], torch.Tensor]) -> None:
    """Stream a safetensors file: the header from `entries` (name, shape, dtype), then each tensor `value(name)`
    cast to its dtype and written before the next is made."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(blob)))
        file.write(blob)
        for name, shape, dtype in entries:
            tensor = value(name).to(dtype)
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: made {tuple(tensor.shape)}, declared {tuple(shape)}")
            file.write(_raw_bytes(tensor))
            del tensor


def write_safetensors_shards(folder: Path, entries, value, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` and
    `model.safetensors.index.json`, as `save_pretrained` lays them out."""
    shards, current, size = [], [], 0
    for entry in entries:
        entry_bytes = nbytes([entry])
        if current and size + entry_bytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry_bytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], value)
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, value)
        weight_map.update({entry[0]: name for entry in shard})
    index = {"metadata": {"total_size": nbytes(entries)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles as `torch.save` pickles a contiguous tensor of `storage`, without holding its data."""

    def __init__(self, storage: _Storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        args = (self.storage, 0, torch.Size(self.shape), stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_torch_state_dict(path: Path, entries, value: Callable[[str], torch.Tensor]) -> None:
    """Stream a `torch.save`-format file of the state dict {name: tensor} (zip: `data.pkl`, then one record per
    storage), making each tensor `value(name)` only when its record is written; `torch.load(weights_only=True)`
    reads it like any `torch.save` file."""
    stubs = {}
    for index, (name, shape, dtype) in enumerate(entries):
        stubs[name] = _TensorStub(_Storage(str(index), dtype, math.prod(shape)), shape)
    buffer = io.BytesIO()
    _StubPickler(buffer, protocol=2).dump(stubs)
    data = buffer.getvalue()
    alignment = str(torch.serialization._get_storage_alignment())
    with torch.serialization._open_zipfile_writer(str(path)) as archive:
        # The records torch.save writes, in its order.
        archive.write_record("data.pkl", data, len(data))
        archive.write_record(".format_version", "1", 1)
        archive.write_record(".storage_alignment", alignment, len(alignment))
        archive.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for index, (name, shape, dtype) in enumerate(entries):
            tensor = value(name).to(dtype).contiguous().clone()  # its own storage, exactly its bytes
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: made {tuple(tensor.shape)}, declared {tuple(shape)}")
            storage = tensor.untyped_storage()
            archive.write_record(f"data/{index}", storage, storage.nbytes())
            del tensor, storage


# ----------------------------------------------------------------------------------------------------------
# The inputs: what each is made of (sizes known without writing), and how it is written
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """One checkpoint of an input: a model folder (`config` saved, weights in safetensors shards, `extra` files),
    a `.pt` state dict (`config` None, `torch_file`), or plain files (`extra` only, no `entries`)."""

    path: str
    entries: list = field(default_factory=list)
    value: Callable[[str], torch.Tensor] | None = None
    config: object | None = None
    torch_file: bool = False
    extra: Callable[[Path], None] | None = None

    def write(self, root: Path) -> None:
        target = root / self.path
        if self.torch_file:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_torch_state_dict(target, self.entries, self.value)
            return
        target.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            self.config.save_pretrained(target)
        if self.entries:
            write_safetensors_shards(target, self.entries, self.value)
        if self.extra is not None:
            self.extra(target)


@dataclass
class Setting:
    shape: dict
    layers: int | None
    dtype: str  # "auto" or a DTYPES key

    def dtype_of(self, checkpoint: str) -> torch.dtype:
        return RELEASED_DTYPES[checkpoint] if self.dtype == "auto" else DTYPES[self.dtype]

    def fields(self, checkpoint: str) -> dict:
        return with_layers(self.shape[checkpoint], self.layers)


def clip_config(setting: Setting, checkpoint: str, dtype: torch.dtype):
    from transformers import CLIPConfig

    config = CLIPConfig(**setting.fields(checkpoint))
    config.architectures, config.dtype = ["CLIPModel"], dtype
    return config


def save_clip_processor(config) -> Callable[[Path], None]:
    """Writes a CLIP processor (the toy byte-level tokenizer: conversion does not depend on the vocabulary)."""

    def extra(folder: Path):
        from transformers import CLIPProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from hf_moe.toy import toy_clip_tokenizer

        size = config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        CLIPProcessor(image_processor=image_processor, tokenizer=toy_clip_tokenizer()).save_pretrained(folder)

    return extra


def clip_artifacts(setting: Setting, checkpoint: str, task: int = 0, path: str = ".") -> Artifact:
    """A dense `CLIPModel` folder; `task` >= 1: that MCL stage (the base with the MLPs of both towers changed)."""
    from transformers import CLIPModel

    dtype = setting.dtype_of(checkpoint)
    config = clip_config(setting, checkpoint, dtype)
    entries = cast_entries(tensor_specs(CLIPModel, config), dtype)
    shapes = {name: shape for name, shape, _ in entries}

    def value(name):
        if task == 0:
            return random_tensor(name, shapes[name])
        return tuned_tensor(name, shapes[name], torch.float32, task, lambda key: ".mlp." in key)

    return Artifact(path, entries, value, config, extra=save_clip_processor(config))


def _vision_key(name: str) -> str:
    return name if name.startswith("vision_model.") else f"vision_model.{name}"


def clip_vision_finetunes(setting: Setting, checkpoint: str) -> list[Artifact]:
    """`NUM_TASKS` `CLIPVisionModel` folders: the base's vision tower, every tensor of it fine-tuned."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    dtype = setting.dtype_of(checkpoint)
    config = CLIPVisionConfig(**setting.fields(checkpoint)["vision_config"])
    config.architectures, config.dtype = ["CLIPVisionModel"], dtype
    # Named as the Hub's fine-tunes (saved by transformers 4) name them, `vision_model.*` as in `CLIPModel`, which
    # transformers 5 maps onto its flatter `CLIPVisionModel`; so they share the base tensors by name.
    specs = tensor_specs(CLIPVisionModel, config)
    entries = cast_entries([(_vision_key(name), shape, old) for name, shape, old in specs], dtype)
    shapes = {name: shape for name, shape, _ in entries}
    artifacts = []
    for task in range(1, NUM_TASKS + 1):

        def value(name, task=task):
            return tuned_tensor(name, shapes[name], torch.float32, task, lambda key: key.startswith("vision_model."))

        artifacts.append(Artifact(f"task{task}", entries, value, config))
    return artifacts


def clip_moe_original_artifact(setting: Setting) -> Artifact:
    """The official CLIP-MoE release format on the ViT-L/14 shape: OpenAI-CLIP keys, in every block of both towers
    `NUM_CLIP_MOE_EXPERTS` experts (expert 0 the base MLP, expert e its MCL stage e) and a gate; fused attention
    in-projections, `(in, out)` projections, Long-CLIP's `positional_embedding` + `positional_embedding_res`."""
    fields = setting.fields("clip_l14")
    text, vision, projection = fields["text_config"], fields["vision_config"], fields["projection_dim"]
    t, v, patch = text["hidden_size"], vision["hidden_size"], vision["patch_size"]
    made = {}  # OpenAI key -> (shape, function making it from the HF-named base tensors)

    def copy(key, name, shape):
        made[key] = (tuple(shape), lambda: random_tensor(name, shape))

    def transposed(key, name, shape):  # OpenAI stores (in, out) projections
        made[key] = (tuple(shape), lambda: random_tensor(name, shape[::-1]).t())

    copy("visual.class_embedding", "vision_model.embeddings.class_embedding", (v,))
    copy("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", (v, 3, patch, patch))
    patches = (vision["image_size"] // patch) ** 2 + 1
    copy("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", (patches, v))
    for key, name in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
    ):
        copy(f"{key}.weight", f"{name}.weight", (v,))
        copy(f"{key}.bias", f"{name}.bias", (v,))
    transposed("visual.proj", "visual_projection.weight", (v, projection))
    copy("token_embedding.weight", "text_model.embeddings.token_embedding.weight", (text["vocab_size"], t))
    for key in ("positional_embedding", "positional_embedding_res"):  # Long-CLIP's frozen and trained copies
        copy(key, key, (LONG_CLIP_POSITIONS, t))
    copy("ln_final.weight", "text_model.final_layer_norm.weight", (t,))
    copy("ln_final.bias", "text_model.final_layer_norm.bias", (t,))
    transposed("text_projection", "text_projection.weight", (t, projection))
    copy("logit_scale", "logit_scale", ())
    for tower, oa_tower, config in (
        ("vision_model", "visual.transformer", vision),
        ("text_model", "transformer", text),
    ):
        d, inner = config["hidden_size"], config["intermediate_size"]
        for i in range(config["num_hidden_layers"]):
            hf, oa = f"{tower}.encoder.layers.{i}", f"{oa_tower}.resblocks.{i}"
            for kind, shape in (("weight", (d, d)), ("bias", (d,))):
                qkv = [f"{hf}.self_attn.{p}_proj.{kind}" for p in "qkv"]
                made[f"{oa}.attn.in_proj_{kind}"] = (
                    (3 * d, *shape[1:]), lambda qkv=qkv, s=shape: torch.cat([random_tensor(n, s) for n in qkv])
                )  # fmt: skip
                copy(f"{oa}.attn.out_proj.{kind}", f"{hf}.self_attn.out_proj.{kind}", shape)
                copy(f"{oa}.ln_1.{kind}", f"{hf}.layer_norm1.{kind}", (d,))
                copy(f"{oa}.ln_2.{kind}", f"{hf}.layer_norm2.{kind}", (d,))
            copy(f"{oa}.gate.weight", f"{oa}.gate.weight", (NUM_CLIP_MOE_EXPERTS, d))
            for e in range(NUM_CLIP_MOE_EXPERTS):
                for oa_fc, fc, shape in (("c_fc", "fc1", (inner, d)), ("c_proj", "fc2", (d, inner))):
                    for kind, s in (("weight", shape), ("bias", shape[:1])):
                        name = f"{hf}.mlp.{fc}.{kind}"
                        made[f"{oa}.experts.{e}.{oa_fc}.{kind}"] = (
                            s, lambda name=name, s=s, e=e: tuned_tensor(name, s, torch.float32, e, lambda _: e > 0)
                        )  # fmt: skip
    dtype = setting.dtype_of("clip_l14")
    entries = [(key, shape, dtype) for key, (shape, _) in made.items()]
    return Artifact("clip-moe-4-2.pt", entries, lambda key: made[key][1](), torch_file=True)


PHI3_SPECIALS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]  # fmt: skip  ids 32000.. in Phi-3-mini's tokenizer
PHI3_TEXT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def save_phi3_tokenizer(base_vocab: int) -> Callable[[Path], None]:
    """A word-level tokenizer of Phi-3-mini's size (`base_vocab` + its 11 added specials: 32011 tokens for 32064
    embedding rows) and layout, without `<image>`, with a text-only chat template (as Phi-3's own)."""

    def extra(folder: Path):
        from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        vocab.update({f"w{i}": i for i in range(3, base_vocab)})
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.add_special_tokens([AddedToken(token, special=True) for token in PHI3_SPECIALS])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
            unk_token="<unk>",
        )  # fmt: skip
        tokenizer.chat_template = PHI3_TEXT_TEMPLATE
        tokenizer.save_pretrained(folder)

    return extra


def phi3_artifact(setting: Setting) -> Artifact:
    from transformers import Phi3Config, Phi3ForCausalLM

    dtype = setting.dtype_of("phi3_mini")
    config = Phi3Config(**setting.fields("phi3_mini"))
    config.architectures, config.dtype = ["Phi3ForCausalLM"], dtype
    entries = cast_entries(tensor_specs(Phi3ForCausalLM, config), dtype)
    shapes = {name: shape for name, shape, _ in entries}
    extra = save_phi3_tokenizer(setting.shape["phi3_base_vocab"])
    return Artifact(".", entries, lambda name: random_tensor(name, shapes[name]), config, extra=extra)


def siglip_artifact(setting: Setting) -> Artifact:
    from transformers import SiglipConfig, SiglipModel

    dtype = setting.dtype_of("siglip_so400m")
    fields = setting.fields("siglip_so400m")
    config = SiglipConfig(text_config=fields["text_config"], vision_config=fields["vision_config"])
    config.architectures, config.dtype = ["SiglipModel"], dtype
    entries = cast_entries(tensor_specs(SiglipModel, config), dtype)
    shapes = {name: shape for name, shape, _ in entries}

    def extra(folder: Path):
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        size = config.vision_config.image_size
        SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)

    return Artifact(".", entries, lambda name: random_tensor(name, shapes[name]), config, extra=extra)


def mode_expert_artifacts(setting: Setting) -> list[Artifact]:
    """`NUM_MODE_EXPERTS` CLIP ViT-B/32 data experts (each its own random weights)."""
    from transformers import CLIPModel

    dtype = setting.dtype_of("clip_b32")
    config = clip_config(setting, "clip_b32", dtype)
    entries = cast_entries(tensor_specs(CLIPModel, config), dtype)
    shapes = {name: shape for name, shape, _ in entries}
    return [
        Artifact(f"expert{k}", entries, lambda name, k=k: random_tensor(name, shapes[name], seed=SEED + 100 + k),
                 config, extra=save_clip_processor(config))
        for k in range(NUM_MODE_EXPERTS)
    ]  # fmt: skip


def bert_artifact(setting: Setting) -> Artifact:
    from transformers import BertConfig, BertModel

    dtype = setting.dtype_of("simcse_bert")
    config = BertConfig(**setting.fields("simcse_bert"))
    config.architectures, config.dtype = ["BertModel"], dtype
    entries = cast_entries(tensor_specs(BertModel, config), dtype)
    shapes = {name: shape for name, shape, _ in entries}

    def extra(folder: Path):
        from transformers import BertTokenizer

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz."]
        words += [f"w{i}" for i in range(config.vocab_size - len(words))]
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        BertTokenizer(str(folder / "vocab.txt"), model_max_length=config.max_position_embeddings).save_pretrained(
            folder
        )

    return Artifact(".", entries, lambda name: random_tensor(name, shapes[name]), config, extra=extra)


def mode_clusters_artifact(setting: Setting) -> Artifact:
    """`hf-moe mode cluster`'s output: `clusters.json` and `centers.safetensors` (fine centers of the BERT's
    pooler dim, the fine -> coarse map); its encoder is the `simcse_bert` input, passed as --clustering_encoder."""
    fine, dim = setting.shape["mode_fine_clusters"], setting.fields("simcse_bert")["hidden_size"]

    def extra(folder: Path):
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(SEED)
        centers = {
            "fine_centers": torch.nn.functional.normalize(torch.randn(fine, dim, generator=generator), dim=1),
            "coarse_centers": torch.randn(NUM_MODE_EXPERTS, dim, generator=generator),
            "fine_to_coarse": torch.arange(fine) % NUM_MODE_EXPERTS,
        }
        save_file(centers, folder / "centers.safetensors")
        info = {
            "num_fine_clusters": fine,
            "num_experts": NUM_MODE_EXPERTS,
            "encoder": {"name_or_path": "simcse_bert", "pooling": "pooler", "max_length": 77},
            "seed": SEED,
        }
        (folder / "clusters.json").write_text(json.dumps(info, indent=2) + "\n")

    return Artifact(".", extra=extra)


# Input name -> its checkpoints. Each input is one folder under WORK/inputs/; the case commands take the paths.
INPUTS: dict[str, Callable[[Setting], list[Artifact]]] = {
    "clip_l14": lambda s: [clip_artifacts(s, "clip_l14")],
    "clip_l14_mcl": lambda s: [clip_artifacts(s, "clip_l14", task, f"stage{task}") for task in (1, 2, 3)],
    "clip_moe_original": lambda s: [clip_moe_original_artifact(s)],
    "clip_l14_tasks": lambda s: clip_vision_finetunes(s, "clip_l14"),
    "clip_b32": lambda s: [clip_artifacts(s, "clip_b32")],
    "clip_b32_tasks": lambda s: clip_vision_finetunes(s, "clip_b32"),
    "phi3_mini": lambda s: [phi3_artifact(s)],
    "siglip_so400m": lambda s: [siglip_artifact(s)],
    "mode_experts": mode_expert_artifacts,
    "simcse_bert": lambda s: [bert_artifact(s)],
    "mode_clusters": lambda s: [mode_clusters_artifact(s)],
}


# ----------------------------------------------------------------------------------------------------------
# Cases: the converter command lines
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    description: str
    inputs: tuple[str, ...]
    command: Callable[[dict[str, list[str]], str], list[str]]  # (input paths by name, output dir) -> hf-moe argv
    converted: tuple[str, ...] | None = None  # the inputs whose weights are converted (default: all)


def _tasks(paths, pretrained, tasks):
    return [*paths[pretrained], *paths[tasks]]


CASES = {
    "clip_l14_sparse": Case(
        "CLIP ViT-L/14, sparse upcycling (1 base, 4 experts, top-2)",
        ("clip_l14",),
        lambda p, out: ["upcycle-clip", *p["clip_l14"], "--num_experts", "4", "--top_k", "2", "--output_dir", out],
    ),
    "clip_l14_multiplet": Case(
        "CLIP ViT-L/14, multiplet upcycling (4 MCL bases, 4 experts, top-2)",
        ("clip_l14", "clip_l14_mcl"),
        lambda p, out: ["upcycle-clip", *p["clip_l14"], *p["clip_l14_mcl"], "--top_k", "2", "--output_dir", out],
    ),
    "clip_l14_original": Case(
        "CLIP ViT-L/14, official .pt release (4 experts in all 36 blocks, fp32) -> CLIP-MoE folder",
        ("clip_moe_original", "clip_l14"),
        lambda p, out: [
            "convert-clip-moe-original",
            *p["clip_moe_original"],
            "--base",
            *p["clip_l14"],
            "--top_k",
            "2",
            "--output_dir",
            out,
        ],  # fmt: skip
        converted=("clip_moe_original",),
    ),
    "wemoe_l14_8": Case(
        "WEMoE, CLIP ViT-L/14 + 8 vision fine-tunes (2-layer routers per block)",
        ("clip_l14", "clip_l14_tasks"),
        lambda p, out: ["merge-wemoe", *_tasks(p, "clip_l14", "clip_l14_tasks"), "--output_dir", out],
    ),
    "wemoe_b32_8": Case(
        "WEMoE, CLIP ViT-B/32 + 8 vision fine-tunes (2-layer routers per block)",
        ("clip_b32", "clip_b32_tasks"),
        lambda p, out: ["merge-wemoe", *_tasks(p, "clip_b32", "clip_b32_tasks"), "--output_dir", out],
    ),
    "ewemoe_b32_8": Case(
        "E-WEMoE, CLIP ViT-B/32 + 8 vision fine-tunes (shared router, 90% pruned task vectors)",
        ("clip_b32", "clip_b32_tasks"),
        lambda p, out: [
            "merge-wemoe",
            *_tasks(p, "clip_b32", "clip_b32_tasks"),
            "--shared_router",
            "--prune_ratio",
            "0.9",
            "--output_dir",
            out,
        ],  # fmt: skip
    ),
    "merge_b32_8": Case(
        "Task arithmetic, CLIP ViT-B/32 + 8 vision fine-tunes",
        ("clip_b32", "clip_b32_tasks"),
        lambda p, out: [
            "merge",
            "--method",
            "task_arithmetic",
            *_tasks(p, "clip_b32", "clip_b32_tasks"),
            "--output_dir",
            out,
        ],  # fmt: skip
    ),
    "ties_b32_8": Case(
        "TIES merging, CLIP ViT-B/32 + 8 vision fine-tunes",
        ("clip_b32", "clip_b32_tasks"),
        lambda p, out: ["merge", "--method", "ties", *_tasks(p, "clip_b32", "clip_b32_tasks"), "--output_dir", out],
    ),
    "moiie_phi3_siglip": Case(
        "MoIIE, Phi-3-mini-4k (bf16) + SigLIP-so400m-384 (SiglipModel), 1 vision / 2 shared / 1 language experts",
        ("phi3_mini", "siglip_so400m"),
        lambda p, out: [
            "upcycle-moiie",
            "--llm",
            *p["phi3_mini"],
            "--vision",
            *p["siglip_so400m"],
            "--output_dir",
            out,
        ],  # fmt: skip
    ),
    "mode_b32_4": Case(
        "MoDE, 4 CLIP ViT-B/32 data experts + SimCSE BERT-base clustering encoder, 1024 fine clusters",
        ("mode_experts", "simcse_bert", "mode_clusters"),
        lambda p, out: [
            "mode",
            "build",
            *p["mode_experts"],
            "--clusters",
            *p["mode_clusters"],
            "--clustering_encoder",
            *p["simcse_bert"],
            "--output_dir",
            out,
        ],  # fmt: skip
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Generation (once, cached) and measurement (a fresh process per case)
# ----------------------------------------------------------------------------------------------------------


def setting_dir(work_dir: Path, args) -> Path:
    depth = "full" if args.layers is None else f"L{args.layers}"
    return work_dir / f"{args.shape}-{depth}-{args.dtype}"


def input_paths(root: Path, name: str, artifacts: list[Artifact]) -> list[str]:
    return [str((root / "inputs" / name / artifact.path).resolve()) for artifact in artifacts]


def ensure_input(root: Path, name: str, artifacts: list[Artifact]) -> float | None:
    """Write the input `name` unless a complete copy is there; the seconds it took, None when cached."""
    folder = root / "inputs" / name
    if (folder / COMPLETE).is_file():
        return None
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted generation
    log(f"[inputs] writing {name} ({sum(nbytes(a.entries) for a in artifacts) / 1e9:.2f} GB) to {folder}")
    start = time.perf_counter()
    folder.mkdir(parents=True)
    for artifact in artifacts:
        artifact.write(folder)
    (folder / COMPLETE).write_text("")
    return time.perf_counter() - start


def weight_bytes(paths) -> int:
    total = 0
    for path in map(Path, paths):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))
    return total


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def hf_moe_command() -> list[str]:
    """The `hf-moe` console script of this interpreter's environment (else the one on PATH, else `-m`)."""
    script = Path(sys.executable).parent / "hf-moe"
    if script.is_file():
        return [str(script)]
    found = shutil.which("hf-moe")
    return [found] if found else [sys.executable, "-m", "hf_moe.cli"]


def _status_bytes(pid: int, fields=("VmRSS", "RssAnon")) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(m.group(1)) * 1024 for key in fields if (m := re.search(rf"^{key}:\s+(\d+) kB", text, re.M))}


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing, or the process just ended
        return []


def run_measured(argv: list[str], log_path: Path, max_rss_bytes: int | None = None) -> dict:
    """Run `argv` in a fresh process (offline); its wall time, the kernel's peak RSS (`/usr/bin/time -v`) and the
    polled peak RSS / anonymous RSS summed over its process tree. Above `max_rss_bytes` (polled) the tree is
    killed, so that a converter that does not fit does not push a shared machine into swap or the OOM killer."""
    use_time = os.access(TIME_BIN, os.X_OK)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    peak_rss = peak_anon = 0
    over_limit = False
    with open(log_path, "w") as output:
        start = time.perf_counter()
        process = subprocess.Popen([TIME_BIN, "-v", *argv] if use_time else argv, stdout=output, stderr=output, env=env)
        while process.poll() is None:
            pids = _descendants(process.pid) if use_time else [process.pid, *_descendants(process.pid)]
            usage = [_status_bytes(pid) for pid in pids]
            rss = sum(u.get("VmRSS", 0) for u in usage)
            peak_rss = max(peak_rss, rss)
            peak_anon = max(peak_anon, sum(u.get("RssAnon", 0) for u in usage))
            if max_rss_bytes is not None and rss > max_rss_bytes and not over_limit:
                over_limit = True
                for pid in reversed(pids):  # the converter (and its children) we started; `time` then reports
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(POLL_S)
        wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    result = {"returncode": process.returncode, "wall_s": round(wall, 2)}
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    result["peak_rss_bytes"] = int(match.group(1)) * 1024 if match else None
    if use_time and process.returncode == 0:
        exit_status = re.search(r"Exit status: (\d+)", text)
        result["returncode"] = int(exit_status.group(1)) if exit_status else 0
    result["peak_rss_polled_bytes"] = peak_rss
    result["peak_rss_anon_polled_bytes"] = peak_anon
    if over_limit:
        result["returncode"] = result["returncode"] or -9
        result["error"] = f"killed by the benchmark: resident set above --max_rss_gb {max_rss_bytes / 1e9:g}"
    elif result["returncode"] != 0:
        tail = [line for line in text.splitlines() if line.strip() and not line.startswith("\t")][-4:]
        result["error"] = f"exit status {result['returncode']} (-9/137: killed for memory): " + " | ".join(tail)
    return result


def prepare_inputs(name: str, root: Path, setting: Setting) -> tuple[dict[str, list[str]], dict[str, float]]:
    """The paths of case `name`'s inputs (written first where missing) and the seconds each new one took."""
    paths, generation_s = {}, {}
    for input_name in CASES[name].inputs:
        artifacts = INPUTS[input_name](setting)
        seconds = ensure_input(root, input_name, artifacts)
        if seconds is not None:
            generation_s[input_name] = round(seconds, 1)
        paths[input_name] = input_paths(root, input_name, artifacts)
    return paths, generation_s


def run_case(name: str, root: Path, setting: Setting, args) -> dict:
    case = CASES[name]
    paths, generation_s = prepare_inputs(name, root, setting)
    output_dir = root / "outputs" / name
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    argv = case.command(paths, str(output_dir))
    converted = case.converted or case.inputs
    result = {
        "description": case.description,
        "command": "hf-moe " + " ".join(argv),
        "input_bytes": weight_bytes([p for n in converted for p in paths[n]]),
    }
    log(f"[{name}] hf-moe {' '.join(argv[:2])} ... ({result['input_bytes'] / 1e9:.2f} GB in)")
    max_rss = None if args.max_rss_gb is None else int(args.max_rss_gb * 1e9)
    result.update(run_measured([*hf_moe_command(), *argv], root / "outputs" / f"{name}.log", max_rss))
    if "error" not in result:
        result["output_bytes"] = weight_bytes([output_dir])
        result["output_folder_bytes"] = folder_bytes(output_dir)
        result["output_weight_files"] = sorted(
            p.name for p in output_dir.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
        )
        if result["output_bytes"] and result["peak_rss_bytes"]:
            result["peak_over_output"] = round(result["peak_rss_bytes"] / result["output_bytes"], 3)
        log(
            f"[{name}] {result['wall_s']:.1f} s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB for "
            f"{result['output_bytes'] / 1e9:.2f} GB written ({result.get('peak_over_output')}x)"
        )
    else:
        log(f"[{name}] failed: {result['error']}")
    if generation_s:
        result["inputs_generated_s"] = generation_s
    if not args.keep_outputs and output_dir.exists():
        shutil.rmtree(output_dir)
    return result


def plan(setting: Setting, cases: list[str]) -> dict:
    """Input bytes per case from the meta-device shapes (nothing written)."""
    sizes = {name: sum(nbytes(a.entries) for a in build(setting)) for name, build in INPUTS.items()}
    out = {}
    for name in cases:
        case = CASES[name]
        out[name] = {
            "description": case.description,
            "input_bytes": sum(sizes[n] for n in case.converted or case.inputs),
            "inputs_on_disk_bytes": {n: sizes[n] for n in case.inputs},
        }
    return out


def git_state() -> dict:
    repo = Path(__file__).resolve().parents[1]

    def git(*argv):
        done = subprocess.run(["git", *argv], cwd=repo, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "conversion", "hf_moe", "modeling")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(changed) if changed is not None else None,
    }


def machine() -> dict:
    memory = None
    try:
        memory = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    return {
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def goals(results: dict) -> dict:
    ratios = {name: r.get("peak_over_output") for name, r in results.items()}
    return {
        "peak_over_output <= 1.25": ratios,
        "met": bool(ratios) and all(ratio is not None and ratio <= 1.25 for ratio in ratios.values()),
    }


def short_command(argv: list[str]) -> str:
    """`hf-moe` and the options of `argv`, without the paths (and the options that take them)."""
    words = []
    for index, word in enumerate(argv):
        follows_path = index + 1 < len(argv) and "/" in argv[index + 1]
        if "/" not in word and not (word.startswith("--") and follows_path):
            words.append(word)
    return " ".join(["hf-moe", *words])


def markdown_table(results: dict) -> str:
    """The README's table of a report's cases (GB = 1e9 bytes)."""
    rows = [
        "| Case | Command | Inputs (GB) | Output (GB) | Peak RSS (GB) | Peak / output | Wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        command = short_command(r.get("command", "").split()[1:])
        if "error" in r:
            rows.append(f"| {name} | `{command}` | {r.get('input_bytes', 0) / 1e9:.2f} | failed | | | |")
            continue
        rows.append(
            f"| {name} | `{command}` | {r['input_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.2f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} | {r.get('peak_over_output', float('nan')):.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"Cases to run (default all): {', '.join(CASES)}.")  # fmt: skip
    parser.add_argument("--layers", type=int, help="Blocks per tower / decoder (default: the released depth).")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="real",
                        help="real: the released widths; tiny: a few-KB stand-in for the smoke test.")  # fmt: skip
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the generated checkpoints (auto: each as released).")  # fmt: skip
    parser.add_argument("--work_dir", default=str(Path.home() / ".cache" / "hf-moe-benchmarks" / "conversion"),
                        help="Where the inputs are generated once (and outputs written, then deleted).")  # fmt: skip
    parser.add_argument("--output", help="Also write the JSON report to this file.")
    parser.add_argument("--keep_outputs", action="store_true", help="Keep the converted folders.")
    parser.add_argument("--plan", action="store_true", help="Only report the input sizes per case.")
    parser.add_argument(
        "--max_rss_gb",
        type=float,
        help="Kill a converter whose resident set (polled) exceeds this many GB (default: no limit).",
    )
    parser.add_argument(
        "--delete_inputs",
        action="store_true",
        help="Delete each input after the last selected case that reads it (less disk at a time).",
    )
    parser.add_argument("--generate_only", action="store_true", help="Write the cases' inputs, run nothing.")
    parser.add_argument("--skip_baseline", action="store_true", help="Do not measure the bare interpreter.")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setting = Setting(SHAPES[args.shape], args.layers, args.dtype)
    cases = list(dict.fromkeys(args.cases))
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/conversion.py " + " ".join(argv),
        "machine": machine(),
        "hf_moe": git_state(),
        "shape": {"name": args.shape, "layers": args.layers or "released", "dtype": args.dtype},
    }
    if args.plan:
        report["plan"] = plan(setting, cases)
    else:
        root = setting_dir(Path(args.work_dir).expanduser(), args)
        root.mkdir(parents=True, exist_ok=True)
        report["work_dir"] = str(root)
        (root / "outputs").mkdir(exist_ok=True)
        if args.generate_only:
            report["inputs_generated_s"] = {name: prepare_inputs(name, root, setting)[1] for name in cases}
            print(json.dumps(report, indent=2))
            return
        report["memory_method"] = (
            "each converter is its console command in a fresh process, offline; peak_rss_bytes: /usr/bin/time -v "
            "'Maximum resident set size' of that process; peak_rss_polled_bytes / peak_rss_anon_polled_bytes: the "
            "process tree's summed VmRSS / RssAnon polled every 50 ms (file pages of memory-mapped inputs are in "
            "VmRSS, not in RssAnon); output_bytes: the weight files written; inputs in the page cache"
        )
        if not args.skip_baseline:
            log("[baseline] python -c 'import torch, transformers, hf_moe.conversion'")
            baseline_argv = [sys.executable, "-c", "import torch, transformers, hf_moe.conversion"]
            report["interpreter_baseline"] = run_measured(baseline_argv, root / "outputs" / "baseline.log")
        report["cases"] = {}
        for index, name in enumerate(cases):
            try:
                report["cases"][name] = run_case(name, root, setting, args)
            except Exception as err:  # an input that cannot be generated: reported, the other cases still run
                log(f"[{name}] failed before the converter ran: {err!r}")
                report["cases"][name] = {"description": CASES[name].description, "error": repr(err)}
            if args.delete_inputs:
                later = {input_name for other in cases[index + 1 :] for input_name in CASES[other].inputs}
                for input_name in set(CASES[name].inputs) - later:
                    shutil.rmtree(root / "inputs" / input_name, ignore_errors=True)
        baseline = report.get("interpreter_baseline", {}).get("peak_rss_bytes")
        for result in report["cases"].values():
            if baseline and result.get("output_bytes") and result.get("peak_rss_bytes"):
                # what the conversion itself holds: at reduced depth the interpreter is a large share of the peak
                net = (result["peak_rss_bytes"] - baseline) / result["output_bytes"]
                result["peak_minus_baseline_over_output"] = round(net, 3)
        report["goals"] = goals(report["cases"])
        log(markdown_table(report["cases"]))
    write_report(report, args.output)


if __name__ == "__main__":
    main()

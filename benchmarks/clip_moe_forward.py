# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Image-encoding throughput and peak memory of CLIP-MoE vision towers against a dense CLIP.

What is measured: the forward pass (under `torch.inference_mode()`) of one batch of random images through
a vision tower with its projection, for

* `dense`: transformers' `CLIPVisionModelWithProjection` of the same shape (the reference);
* `official_loop`: the official CLIP-MoE implementation's MoE MLP, a Python loop over per-expert
  `nn.Sequential(Linear, QuickGELU, Linear)` modules with `torch.where` + `index_add_`, put into the
  CLIPMoE tower in place of every `MoESparseBlock` (same weights, checked to give the same image embeddings
  as `eager` at fp32 before timing);
* `eager`, `batched_mm`, `grouped_mm`: `CLIPMoEVisionModelWithProjection` with each transformers experts
  implementation (an implementation that raises, e.g. out of memory, is recorded with its error).

All MoE variants share one randomly initialised CLIPMoE (every block MoE, experts perturbed so they
differ). With random router weights routing is close to balanced; a trained router is usually less so.

Timing: warm-up passes first, then the median over `--iters` passes (CUDA events around each pass, one
synchronisation at the end, on CUDA; `time.perf_counter` on CPU). Peak memory: on CUDA
`torch.cuda.max_memory_allocated`, reset before each variant, with only that variant on the GPU (so it is
weights + activations); on CPU the process-wide max RSS, which never decreases, so a variant's figure also
covers the variants measured before it. `flop_limit_vs_dense` is dense FLOPs / MoE FLOPs of the tower
(MLP FLOPs x top_k, plus the router; attention and embeddings unchanged): the throughput ratio an MoE
would reach vs dense if its experts ran at dense-MLP efficiency.

One JSON object goes to stdout, progress to stderr:

    python benchmarks/clip_moe_forward.py                                  # tiny, CPU-friendly (< 1 min)
    python benchmarks/clip_moe_forward.py --shape vit-l-14                 # bf16, batch 256, on CUDA
    python benchmarks/clip_moe_forward.py --shape vit-b-32 --top_k 1 --iters 20

`batched_mm` gathers one full expert weight matrix per (token, expert) pair, so it runs out of memory at
ViT batch sizes on a GPU; it is meant for few-token decoding and is recorded as an error there.
"""

import argparse
import copy
import gc
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_moe.modeling import CLIPMoEVisionConfig, CLIPMoEVisionModelWithProjection, MoEMLPExperts, MoESparseBlock


EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0
CHECK_BATCH_SIZE = 4


@dataclass(frozen=True)
class Shape:
    """A vision tower and the batch it is timed on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    projection_dim: int
    batch_size: int
    dtype: str

    def tower_kwargs(self) -> dict:
        """The fields shared by the dense and the MoE vision configs."""
        fields = asdict(self)
        del fields["batch_size"], fields["dtype"]
        return fields


SHAPES = {
    "tiny": Shape(128, 512, 4, 4, 64, 16, 128, batch_size=32, dtype="float32"),
    "vit-b-32": Shape(768, 3072, 12, 12, 224, 32, 512, batch_size=256, dtype="bfloat16"),
    "vit-l-14": Shape(1024, 4096, 24, 16, 224, 14, 768, batch_size=256, dtype="bfloat16"),
}


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# The official CLIP-MoE MoE MLP
# ----------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, as the official code defines it (same formula as transformers' quick_gelu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class OfficialLoopMoE(nn.Module):
    """The official CLIP-MoE MoE MLP: a bias-free linear gate, fp32 softmax, top-k, renormalisation, then
    a Python loop over per-expert MLP modules gathering their tokens with `torch.where`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, **factory):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        # skip_init: every weight is overwritten from the packed experts, and initialising ViT-L-sized
        # Linear layers on CPU would dominate the set-up time.
        self.gate = nn.utils.skip_init(nn.Linear, hidden_size, num_experts, bias=False, **factory)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.utils.skip_init(nn.Linear, hidden_size, intermediate_size, **factory),
                QuickGELU(),
                nn.utils.skip_init(nn.Linear, intermediate_size, hidden_size, **factory),
            )
            for _ in range(num_experts)
        )

    @classmethod
    @torch.no_grad()
    def from_block(cls, block: MoESparseBlock) -> "OfficialLoopMoE":
        """Per-expert Linear copies of a `MoESparseBlock`'s packed weights (so both compute the same)."""
        packed = block.experts
        factory = dict(device=packed.up_proj.device, dtype=packed.up_proj.dtype)
        loop = cls(packed.hidden_dim, packed.intermediate_dim, packed.num_experts, block.router.top_k, **factory)
        loop.gate.weight.copy_(block.router.weight)
        for e, (fc1, _, fc2) in enumerate(loop.experts):
            fc1.weight.copy_(packed.up_proj[e])
            fc1.bias.copy_(packed.up_proj_bias[e])
            fc2.weight.copy_(packed.down_proj[e])
            fc2.bias.copy_(packed.down_proj_bias[e])
        return loop

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, input_shape[-1])  # (num_tokens, hidden)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)

        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)  # (E, top_k, T)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final_hidden_states.reshape(input_shape)


def to_official_loop(model: CLIPMoEVisionModelWithProjection) -> CLIPMoEVisionModelWithProjection:
    """Replace, in place, every `MoESparseBlock` of the tower by its `OfficialLoopMoE` copy."""
    for layer in model.vision_model.encoder.layers:
        if isinstance(layer.mlp, MoESparseBlock):
            layer.mlp = OfficialLoopMoE.from_block(layer.mlp)
    return model


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def build_dense(shape: Shape) -> CLIPVisionModelWithProjection:
    # Its weights play no part in the timing, so it is initialised independently of the MoE.
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**shape.tower_kwargs())).eval()


@torch.no_grad()
def build_moe(shape: Shape, num_experts: int, top_k: int) -> CLIPMoEVisionModelWithProjection:
    """A randomly initialised CLIPMoE tower (every block MoE) on CPU in fp32: the weights all MoE variants copy."""
    config = CLIPMoEVisionConfig(**shape.tower_kwargs(), num_local_experts=num_experts, num_experts_per_tok=top_k)
    model = CLIPMoEVisionModelWithProjection(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if isinstance(module, MoEMLPExperts):
            # The weights are already drawn per expert, but the biases start at zero for all of them:
            # jitter everything so the experts differ in every parameter, as trained ones do.
            for parameter in module.parameters():
                std = parameter.std().item()
                scale = 0.1 * std if std > 0 else 0.02  # relative for the weights, absolute for the zero biases
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` on `device` in `dtype`, leaving the CPU master copy untouched (`.to` is in place)."""
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def moe_variant(master, implementation: str, device, dtype):
    model = materialise(master, device, dtype)
    model.set_experts_implementation(implementation)
    return model


def official_loop_variant(master, device, dtype):
    return to_official_loop(materialise(master, device, dtype))


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------


def random_images(shape: Shape, batch_size: int, device, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.randn(batch_size, 3, shape.image_size, shape.image_size, generator=generator)
    return pixels.to(device=device, dtype=dtype)


@torch.inference_mode()
def image_embeds(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).image_embeds


def check_official_loop(master, shape: Shape, device) -> dict:
    """Assert the per-expert loop gives the eager CLIPMoE's image embeddings at fp32 (same weights, same routing)."""
    pixel_values = random_images(shape, CHECK_BATCH_SIZE, device, torch.float32)
    expected = image_embeds(moe_variant(master, "eager", device, torch.float32), pixel_values)
    actual = image_embeds(official_loop_variant(master, device, torch.float32), pixel_values)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    return {"batch_size": CHECK_BATCH_SIZE, "dtype": "float32", "max_abs_diff": (actual - expected).abs().max().item()}


@torch.inference_mode()
def time_forward(model: nn.Module, pixel_values: torch.Tensor, warmup: int, iters: int) -> list[float]:
    """Milliseconds per forward pass, one entry per timed pass."""
    for _ in range(warmup):
        model(pixel_values=pixel_values)
    if pixel_values.device.type == "cuda":
        # Events are queued with the work; one synchronisation at the end keeps the host out of the timing.
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            model(pixel_values=pixel_values)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model(pixel_values=pixel_values)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(name: str, build, pixel_values: torch.Tensor, args) -> dict:
    """Build one variant on the device, time it and read its peak memory; an exception becomes an `error` entry."""
    device = pixel_values.device
    release_memory(device)  # previous variants gone, peak counter reset: only this one is measured
    log(f"[{name}] building and timing ({args.warmup} warm-up + {args.iters} passes)")
    model = None
    try:
        model = build()
        times = time_forward(model, pixel_values, args.warmup, args.iters)
        result = {
            "ms_per_batch": statistics.median(times),
            "images_per_s": pixel_values.shape[0] / (statistics.median(times) / 1e3),
            "peak_memory_mib": peak_memory_mib(device),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        }
        log(f"[{name}] {result['ms_per_batch']:.2f} ms/batch, {result['images_per_s']:.1f} images/s")
    except Exception as error:  # e.g. CUDA OOM (batched_mm at ViT batch sizes), an unsupported kernel or dtype
        result = {"error": f"{type(error).__name__}: {error}"}
        log(f"[{name}] failed: {result['error']}")
    del model
    release_memory(device)
    return result


def vision_flops_per_image(shape: Shape, num_experts: int | None = None, top_k: int | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image through the tower; dense when `top_k` is None.

    Norms, softmax and activations are left out: they are a few percent and the same in both models."""
    hidden, inter, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    patches = (shape.image_size // shape.patch_size) ** 2
    tokens = patches + 1  # + class token
    embeddings = 2 * patches * 3 * shape.patch_size**2 * hidden
    attention = 2 * tokens * hidden * 4 * hidden + 2 * 2 * tokens**2 * hidden  # q, k, v, out + scores, mix
    mlp = 2 * 2 * tokens * hidden * inter
    if top_k is not None:
        mlp = top_k * mlp + 2 * tokens * hidden * num_experts  # top-k experts per token + router
    projection = 2 * hidden * shape.projection_dim  # pooled class token only
    return embeddings + layers * (attention + mlp) + projection


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is only the architecture ("x86_64") on Linux
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def add_ratios(variants: dict):
    """Throughput ratios vs dense (all variants) and vs the official loop (the experts implementations)."""

    def throughput(name):
        return variants.get(name, {}).get("images_per_s")

    for name, result in variants.items():
        if "images_per_s" not in result:
            continue
        if throughput("dense"):
            result["ratio_vs_dense"] = result["images_per_s"] / throughput("dense")
        if name in EXPERTS_IMPLEMENTATIONS and throughput("official_loop"):
            result["ratio_vs_official_loop"] = result["images_per_s"] / throughput("official_loop")


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch_size", type=int, help="default: the shape's (tiny 32, ViTs 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the shape's (tiny float32, ViTs bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        parser.error("--warmup must be >= 0 and --iters >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    base = SHAPES[args.shape]
    shape = replace(base, batch_size=args.batch_size or base.batch_size, dtype=args.dtype or base.dtype)
    device, dtype = torch.device(args.device), DTYPES[shape.dtype]
    torch.manual_seed(SEED)

    log(f"building {args.shape} towers ({args.num_experts} experts, top-{args.top_k})")
    master = build_moe(shape, args.num_experts, args.top_k)
    check = check_official_loop(master, shape, device)
    log(f"official loop matches eager at fp32 (max abs diff {check['max_abs_diff']:.2e})")
    release_memory(device)

    pixel_values = random_images(shape, shape.batch_size, device, dtype)
    builds = {
        "dense": lambda: build_dense(shape).to(device=device, dtype=dtype),
        "official_loop": lambda: official_loop_variant(master, device, dtype),
    }
    for implementation in EXPERTS_IMPLEMENTATIONS:
        builds[implementation] = lambda impl=implementation: moe_variant(master, impl, device, dtype)
    variants = {name: measure(name, build, pixel_values, args) for name, build in builds.items()}
    add_ratios(variants)

    dense_flops = vision_flops_per_image(shape)
    moe_flops = vision_flops_per_image(shape, args.num_experts, args.top_k)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "shape": {
            "name": args.shape,
            **asdict(shape),
            "num_tokens": (shape.image_size // shape.patch_size) ** 2 + 1,
            "num_experts": args.num_experts,
            "top_k": args.top_k,
            "moe_layers": "all",
        },
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median", "mode": "inference_mode"},
        "gflops_per_image": {"dense": dense_flops / 1e9, "moe": moe_flops / 1e9},
        "flop_limit_vs_dense": dense_flops / moe_flops,
        "memory_note": (
            "CUDA: torch.cuda.max_memory_allocated with only this variant on the GPU (weights + activations)."
            if device.type == "cuda"
            else "CPU figures are the process-wide max RSS (ru_maxrss) after the variant ran; it never decreases, "
            "so each figure also covers the variants measured before it and the fp32 master copy of the MoE weights."
        ),
        "official_loop_check": check,
        "variants": variants,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

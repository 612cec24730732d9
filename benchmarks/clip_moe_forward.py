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

Timing: every variant runs in a FRESH subprocess, and the whole set is run `--rounds` times interleaved (dense,
official_loop, eager, batched_mm, grouped_mm, dense, ...); in a worker, warm-up passes first, then `--iters` timed
passes (synchronised around each on CUDA). A figure is the median over rounds of the per-round median pass; the
`ratio_vs_*` figures are the medians of the per-round ratios to the dense (or official loop) run of the same round,
so that the drift of a shared machine cancels out. Peak memory: the peak during the timed passes above what the
worker held before them (activations and workspaces; the weights are `weights_mib`): on CPU the resident set size
(VmHWM, reset through /proc/self/clear_refs), on CUDA `torch.cuda.max_memory_allocated`; on CPU `max_rss_mib` is
the worker's lifetime maximum resident size. `flop_limit_vs_dense` is dense FLOPs / MoE FLOPs of the tower
(MLP FLOPs x top_k, plus the router; attention and embeddings unchanged): the throughput ratio an MoE
would reach vs dense if its experts ran at dense-MLP efficiency.

One JSON object goes to stdout, progress to stderr:

    python benchmarks/clip_moe_forward.py                                  # tiny, CPU-friendly (~1 min)
    python benchmarks/clip_moe_forward.py --shape vit-l-14                 # bf16, batch 256, on CUDA
    python benchmarks/clip_moe_forward.py --shape vit-b-32 --top_k 1 --iters 20
    python benchmarks/clip_moe_forward.py --threads 1                      # a busy shared CPU: see below

On a CPU whose cores other processes share, give the workers one thread each (`--threads 1`): two threads that wait
on each other while the other core is busy make a pass many times slower, and by different factors for different
variants.

`batched_mm` gathers one full expert weight matrix per (token, expert) pair, so it runs out of memory at
ViT batch sizes on a GPU; it is meant for few-token decoding and is recorded as an error there.
"""

import argparse
import copy
import gc
import json
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_moe.modeling import CLIPMoEVisionConfig, CLIPMoEVisionModelWithProjection, MoEMLPExperts, MoESparseBlock


# This script's folder is on sys.path when it runs as a script, not when a test loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import (  # noqa: E402
    log,
    max_rss_mib,
    peak_since,
    ratios_per_round,
    report_header,
    reset_peak,
    run_rounds,
    run_worker,
    timed,
    write_report,
)


EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
VARIANTS = ("dense", "official_loop", *EXPERTS_IMPLEMENTATIONS)
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


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_variant(name: str, shape: Shape, args, device, dtype) -> nn.Module:
    if name == "dense":
        return build_dense(shape).to(device=device, dtype=dtype)
    torch.manual_seed(SEED)  # the master MoE every MoE variant (and the check in the parent) starts from
    master = build_moe(shape, args.num_experts, args.top_k)
    # In place: the worker needs no CPU master copy next to the variant.
    model = master.to(device=device, dtype=dtype)
    if name == "official_loop":
        return to_official_loop(model)
    model.set_experts_implementation(name)
    return model


def measure(args) -> dict:
    """In a worker: build variant `args._worker`, time its forward passes and read its peak memory; an exception
    (e.g. CUDA out of memory for batched_mm at ViT batch sizes, an unsupported kernel or dtype) becomes `error`."""
    name, shape = args._worker, selected_shape(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[shape.dtype]
    pixel_values = random_images(shape, shape.batch_size, device, dtype)
    try:
        model = build_variant(name, shape, args, device, dtype)
        with torch.inference_mode():
            for _ in range(args.warmup):
                model(pixel_values=pixel_values)
            baseline = reset_peak(device)
            seconds = timed(device, lambda: model(pixel_values=pixel_values), 0, args.iters)
        result = {
            "ms_per_batch": 1e3 * statistics.median(seconds),
            "ms_all": [1e3 * s for s in seconds],
            "peak_memory_mib": peak_since(device, baseline),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        }
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    if device.type == "cpu":
        result["max_rss_mib"] = max_rss_mib()
    return result


def run_variant(name: str, argv: list[str]) -> dict:
    result = run_worker(__file__, argv, name)
    if "error" in result:
        log(f"[{name}] failed: {result['error']}")
    else:
        log(f"[{name}] {result['ms_per_batch']:.2f} ms/batch, peak +{result['peak_memory_mib']:.0f} MiB")
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


def summarise(rounds: list[dict], batch_size: int) -> dict:
    """`rounds`: per round, {variant: worker result}. Per variant: the median over rounds of its per-round median
    pass, and the throughput ratios to dense (all variants) and to the official loop (the experts implementations),
    each the median of the ratios within a round."""

    def throughput(result: dict) -> float | None:
        return batch_size / (result["ms_per_batch"] / 1e3) if "ms_per_batch" in result else None

    summary = {}
    for name in rounds[0]:
        runs = [results[name] for results in rounds]
        errors = [run["error"] for run in runs if "error" in run]
        if errors:
            summary[name] = {"error": errors[0]}
            continue
        ms = statistics.median(run["ms_per_batch"] for run in runs)
        entry = {
            "ms_per_batch": ms,
            "ms_per_batch_all_rounds": [run["ms_per_batch"] for run in runs],
            "images_per_s": batch_size / (ms / 1e3),
            "peak_memory_mib": statistics.median(run["peak_memory_mib"] for run in runs),
            "weights_mib": runs[0]["weights_mib"],
            "rounds": len(runs),
        }
        if "max_rss_mib" in runs[0]:
            entry["max_rss_mib"] = max(run["max_rss_mib"] for run in runs)
        references = ["dense"] + (["official_loop"] if name in EXPERTS_IMPLEMENTATIONS else [])
        for reference in references:
            ratios = ratios_per_round(rounds, name, reference, throughput)
            if ratios:
                entry[f"ratio_vs_{reference}"] = statistics.median(ratios)
                entry[f"ratio_vs_{reference}_all_rounds"] = ratios
        summary[name] = entry
    return summary


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def selected_shape(args) -> Shape:
    base = SHAPES[args.shape]
    return replace(base, batch_size=args.batch_size or base.batch_size, dtype=args.dtype or base.dtype)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch_size", type=int, help="default: the shape's (tiny 32, ViTs 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the shape's (tiny float32, ViTs bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    parser.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.rounds < 1:
        parser.error("--warmup must be >= 0, --iters and --rounds >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(args)))
        return
    shape = selected_shape(args)
    device = torch.device(args.device)
    torch.manual_seed(SEED)

    log(f"building {args.shape} towers ({args.num_experts} experts, top-{args.top_k})")
    master = build_moe(shape, args.num_experts, args.top_k)
    check = check_official_loop(master, shape, device)
    log(f"official loop matches eager at fp32 (max abs diff {check['max_abs_diff']:.2e})")
    del master
    release_memory(device)

    rounds = run_rounds(args.variants, args.rounds, lambda name: run_variant(name, argv))
    variants = summarise(rounds, shape.batch_size)

    dense_flops = vision_flops_per_image(shape)
    moe_flops = vision_flops_per_image(shape, args.num_experts, args.top_k)
    report = {
        **report_header("clip_moe_forward.py", argv, device, args.threads),
        "shape": {
            "name": args.shape,
            **asdict(shape),
            "num_tokens": (shape.image_size // shape.patch_size) ** 2 + 1,
            "num_experts": args.num_experts,
            "top_k": args.top_k,
            "moe_layers": "all",
        },
        "timing": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "iters": args.iters,
            "statistic": "median over rounds of the per-round median; ratios: median of per-round ratios",
            "mode": "inference_mode",
        },
        "gflops_per_image": {"dense": dense_flops / 1e9, "moe": moe_flops / 1e9},
        "flop_limit_vs_dense": dense_flops / moe_flops,
        "memory_method": (
            "fresh subprocess per variant and round; peak_memory_mib: the peak during the timed passes above what "
            "the worker held before them (activations, workspaces; the weights are weights_mib). CPU: resident set "
            "size (VmHWM, reset through /proc/self/clear_refs), glibc MALLOC_MMAP_THRESHOLD_=65536; max_rss_mib: "
            "the worker's lifetime maximum (resource.getrusage). CUDA: max_memory_allocated minus allocated before"
        ),
        "official_loop_check": check,
        "variants": variants,
    }
    write_report(report)


if __name__ == "__main__":
    main()

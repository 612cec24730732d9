# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Training-step and decode throughput and peak memory of the MoIIE variants against the dense model.

What is measured, for each `--variants` (dense, vanilla, modality, moiie) of `MoIIEPhi3ForCausalLM` at the SAME
shape (randomly initialised; MoE layers on the odd decoder layers, 1 vision / 2 shared / 1 language experts, top-2,
the paper's N = 4; `vanilla` routes every token over the same 4 experts, top-2; `modality` hard-routes each token
to one expert), and, for the MoE variants, each `--experts_implementations` (eager, batched_mm, grouped_mm):

* train: one optimiser step (forward with the router logits and balance losses, backward, `torch.optim.AdamW` step)
  on a batch of `--batch_size` samples, each one image (the shape's tokens per image) followed by text;
  fp32 on CPU, bf16 weights on CUDA. Reported as (non-padding) tokens per second.
* decode: `generate()` with the KV cache, greedy, `min_new_tokens = max_new_tokens = --new_tokens` (every variant
  decodes the same count) from a batch of prompts that each hold an image. Decode tokens per second =
  batch x (new_tokens - 1) / the time from the first to the last generation step (a logits processor notes the
  time of every step), i.e. without the prefill, which is reported apart (`s_prefill`).

Every (variant, experts implementation) runs in a FRESH subprocess, and the whole set is run `--rounds` times
interleaved (dense, vanilla, modality, moiie, dense, ...); a figure is the median over rounds of the per-round
median over `--iters` passes. The `*_vs_dense` ratios are the medians of the per-round ratios to the dense run of
the same round, so that the drift of a shared machine cancels out: absolute numbers are noisy, ratios less so.
Peak memory (per phase): on CPU the peak resident set size during the timed passes minus the resident size before
them (as in benchmarks/we_moe_forward.py), plus the worker's lifetime maximum resident size (`resource`); on CUDA
`torch.cuda.max_memory_allocated` minus the allocated memory before the passes.

One JSON object goes to stdout, progress to stderr:

    python benchmarks/moiie_forward.py --shape tiny --rounds 1         # seconds: the smoke test
    python benchmarks/moiie_forward.py                                 # small shape, CPU (minutes)
    python benchmarks/moiie_forward.py --shape phi3-mini --device cuda # Phi-3-mini + SigLIP-so400m, bf16, a GPU
"""

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM


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
    synchronize,
    timed,
    write_report,
)


SEED = 0
VARIANTS = ("dense", "vanilla", "modality", "moiie")
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_tokens: int  # per sample, after the image
    batch_size: int
    decode_batch_size: int
    new_tokens: int
    dtype: str  # on CUDA; CPU runs are fp32

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SHAPES = {
    "tiny": Shape(32, 64, 2, 2, 2, 128, 32, 64, 1, 2, 16, 8, 12, 2, 2, 4, "float32"),
    # 64 image tokens + 192 text tokens = 256 per sample; Phi-3's intermediate/hidden ratio (8192/3072).
    "small": Shape(256, 704, 6, 8, 8, 4096, 128, 512, 2, 4, 128, 16, 192, 4, 4, 32, "float32"),
    # Phi-3-mini's decoder and SigLIP-so400m-patch14-384's tower: 729 image tokens + 295 text tokens = 1024.
    "phi3-mini": Shape(3072, 8192, 32, 32, 32, 32064, 1152, 4304, 27, 16, 384, 14, 295, 8, 8, 64, "bfloat16"),
}


# ----------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------


def build_config(shape: Shape, variant: str) -> MoIIEConfig:
    vision = dict(
        hidden_size=shape.vision_hidden_size,
        intermediate_size=shape.vision_intermediate_size,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    text = dict(
        model_type="phi3",
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MoIIEConfig(
        vision_config=vision,
        text_config=text,
        variant=variant,
        num_vision_experts=1,
        num_shared_experts=2,
        num_language_experts=1,
        num_experts_per_tok=2,
        image_token_id=shape.vocab_size - 1,
    )


def num_parameters(config: MoIIEConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MoIIEPhi3ForCausalLM(config).parameters())


def build_model(shape: Shape, variant: str, implementation: str | None, device, dtype) -> MoIIEPhi3ForCausalLM:
    torch.manual_seed(SEED)
    model = MoIIEPhi3ForCausalLM(build_config(shape, variant)).to(device=device, dtype=dtype)
    if implementation is not None:
        model.set_experts_implementation(implementation)
    return model


def random_inputs(shape: Shape, batch_size: int, device, seed: int = SEED) -> dict:
    """Per sample: bos, the image's placeholder tokens, then random text."""
    generator = torch.Generator().manual_seed(seed)
    image_token_id = shape.vocab_size - 1
    text = torch.randint(3, image_token_id, (batch_size, shape.text_tokens), generator=generator)
    input_ids = torch.cat(
        [
            torch.full((batch_size, 1), 1),
            torch.full((batch_size, shape.image_tokens), image_token_id),
            text,
        ],
        dim=1,
    )
    pixel_values = torch.randn(batch_size, 3, shape.image_size, shape.image_size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device),
    }


# ----------------------------------------------------------------------------------------------------------
# Measurement (in a fresh process per variant and experts implementation)
# ----------------------------------------------------------------------------------------------------------


def measure_train(model, shape: Shape, args, device) -> dict:
    model.train()
    inputs = random_inputs(shape, shape.batch_size, device)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == shape.vocab_size - 1, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, labels=labels, output_router_logits=model.config.variant != "dense").loss.backward()
        optimizer.step()

    step()  # allocates the gradients and the optimiser state outside the measured peak
    baseline = reset_peak(device)
    times = timed(device, step, args.warmup, args.iters)
    seconds = statistics.median(times)
    return {
        "s_per_step": seconds,
        "s_all": times,
        "tokens_per_s": inputs["input_ids"].numel() / seconds,
        "peak_memory_mib": peak_since(device, baseline),
    }


class StepClock(LogitsProcessor):
    """Notes the time at every generation step (after each forward), so that the decode steps are timed inside one
    generate() call, without its prefill."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def measure_decode(model, shape: Shape, args, device) -> dict:
    model.eval()
    inputs = random_inputs(shape, shape.decode_batch_size, device, seed=SEED + 1)
    config = model.config.text_config
    runs = []

    def generate():
        clock = StepClock(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=shape.new_tokens,
                min_new_tokens=shape.new_tokens,
                pad_token_id=config.pad_token_id,
                eos_token_id=config.eos_token_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        synchronize(device)
        if out.shape[1] != inputs["input_ids"].shape[1] + shape.new_tokens:
            raise RuntimeError(f"generate() returned {out.shape[1]} tokens, expected prompt + {shape.new_tokens}")
        # clock.times[0]: after the prefill's forward; then one time per decode forward.
        runs.append((clock.times[0] - start, clock.times[-1] - clock.times[0], time.perf_counter() - start))

    baseline = reset_peak(device)
    timed(device, generate, args.warmup, args.iters)
    runs = runs[args.warmup :]
    decode_seconds = statistics.median(run[1] for run in runs)
    return {
        "s_generate": statistics.median(run[2] for run in runs),
        "s_prefill": statistics.median(run[0] for run in runs),
        "s_decode": decode_seconds,
        "new_tokens": shape.new_tokens,
        "tokens_per_s": shape.decode_batch_size * (shape.new_tokens - 1) / decode_seconds,
        "peak_memory_mib": peak_since(device, baseline),
    }


def measure(args) -> dict:
    variant, implementation = args._worker.split(":")
    if args.threads:
        torch.set_num_threads(args.threads)
    implementation = None if implementation == "-" else implementation
    device = torch.device(args.device)
    shape = selected_shape(args)
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, shape.dtype)
    model = build_model(shape, variant, implementation, device, dtype)
    result = {"weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    # Decode first: the training step leaves gradients and optimiser state behind.
    if not args.skip_decode:
        result["decode"] = measure_decode(model, shape, args, device)
    if not args.skip_train:
        result["train"] = measure_train(model, shape, args, device)
    if device.type == "cpu":
        result["max_rss_mib"] = max_rss_mib()
    return result


def run_configuration(name: str, argv: list[str]) -> dict:
    """Configuration `name` ("dense" or "variant/implementation") in a fresh worker."""
    variant, _, implementation = name.partition("/")
    result = run_worker(__file__, argv, f"{variant}:{implementation or '-'}")
    label = f"{variant}/{implementation or '-'}"
    if "error" in result:
        log(f"[{label}] failed: {result['error']}")
        return result
    log(
        f"[{label}] "
        + ", ".join(
            f"{phase} {result[phase]['tokens_per_s']:.0f} tok/s" for phase in ("train", "decode") if phase in result
        )
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Aggregation over rounds
# ----------------------------------------------------------------------------------------------------------


def summarise(rounds: list[dict]) -> dict:
    """`rounds`: per round, {config name: worker result}. Per config and phase: medians over the rounds, and the
    median of the per-round ratios to that round's dense run."""
    summary = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        errors = [run["error"] for run in runs if "error" in run]
        if errors:
            summary[name] = {"error": errors[0]}
            continue
        entry = {"weights_mib": runs[0]["weights_mib"], "rounds": len(runs)}
        if "max_rss_mib" in runs[0]:
            entry["max_rss_mib"] = max(run["max_rss_mib"] for run in runs)
        for phase in ("train", "decode"):
            if phase not in runs[0]:
                continue
            stats = {
                "tokens_per_s": statistics.median(run[phase]["tokens_per_s"] for run in runs),
                "tokens_per_s_all_rounds": [run[phase]["tokens_per_s"] for run in runs],
                "peak_memory_mib": statistics.median(run[phase]["peak_memory_mib"] for run in runs),
            }
            dense = [r.get("dense", {}).get(phase) for r in rounds]
            ratios = ratios_per_round(rounds, name, "dense", lambda run, p=phase: run.get(p, {}).get("tokens_per_s"))
            if ratios:
                stats["speed_vs_dense"] = statistics.median(ratios)
                stats["speed_vs_dense_all_rounds"] = ratios
                stats["peak_memory_vs_dense"] = stats["peak_memory_mib"] / max(
                    statistics.median(d["peak_memory_mib"] for d in dense), 1e-9
                )
            entry[phase] = stats
        summary[name] = entry
    return summary


def best_implementations(summary: dict, variants, implementations) -> dict:
    """Per MoE variant and phase: the fastest experts implementation and its ratio to dense."""
    best = {}
    for variant in variants:
        if variant == "dense":
            continue
        for phase in ("train", "decode"):
            candidates = {
                impl: summary[f"{variant}/{impl}"][phase]
                for impl in implementations
                if phase in summary.get(f"{variant}/{impl}", {})
            }
            if candidates:
                impl = max(candidates, key=lambda i: candidates[i]["tokens_per_s"])
                best.setdefault(variant, {})[phase] = {
                    "experts_implementation": impl,
                    "tokens_per_s": candidates[impl]["tokens_per_s"],
                    "speed_vs_dense": candidates[impl].get("speed_vs_dense"),
                }
    return best


def goals(best: dict) -> dict:
    """The issue's goals for top-2 of 4 experts: decode >= 0.7x dense, training step >= 0.6x dense."""
    targets = {"decode": 0.7, "train": 0.6}
    out = {}
    for variant in ("vanilla", "moiie"):
        for phase, target in targets.items():
            ratio = best.get(variant, {}).get(phase, {}).get("speed_vs_dense")
            out[f"{variant}_{phase}_speed_vs_dense >= {target}"] = ratio
    out["met"] = all(value is not None and value >= float(key.rsplit(" ", 1)[1]) for key, value in out.items())
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def selected_shape(args) -> Shape:
    shape = SHAPES[args.shape]
    overrides = {k: getattr(args, k) for k in ("num_hidden_layers", "batch_size", "new_tokens") if getattr(args, k)}
    return replace(shape, **overrides)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_check(shape: Shape, variants, args) -> dict:
    """Bytes the largest variant's training step needs at least (weights, gradients, AdamW's two states), against
    the memory the device has; a `SystemExit` naming both when it does not fit."""
    device = torch.device(args.device)
    bytes_per_value = 4 if device.type == "cpu" else getattr(torch, shape.dtype).itemsize
    parameters = {variant: num_parameters(build_config(shape, variant)) for variant in variants}
    needed = max(parameters.values()) * bytes_per_value * (1 if args.skip_train else 4)
    available = free_memory(device)
    if needed > available:
        raise SystemExit(
            f"--shape {args.shape} needs at least {needed / 2**30:.1f} GiB on {device} for the largest variant "
            f"({max(parameters.values()) / 1e9:.2f}B parameters: weights"
            f"{'' if args.skip_train else ', gradients and 2 AdamW states'} at {bytes_per_value} bytes each), but "
            f"only {available / 2**30:.1f} GiB are free. Use a GPU with more memory, fewer --num_hidden_layers, "
            "or --skip_train."
        )
    return {"parameters": parameters, "min_bytes_needed": needed, "bytes_available": available}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--num_hidden_layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--batch_size", type=int, help="training batch size (default: the shape's)")
    parser.add_argument("--new_tokens", type=int, help="tokens decoded per prompt (default: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--experts_implementations",
        "--experts_implementation",
        nargs="+",
        choices=EXPERTS_IMPLEMENTATIONS,
        default=list(EXPERTS_IMPLEMENTATIONS),
        help="experts implementations measured for every MoE variant (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.rounds < 1:
        parser.error("--warmup must be >= 0, --iters and --rounds >= 1")
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new_tokens must be >= 2 (the decode steps after the first token are timed)")
    if args.skip_train and args.skip_decode:
        parser.error("--skip_train and --skip_decode leave nothing to measure")
    return args


def configurations(args) -> list[str]:
    """ "dense", then "variant/implementation" for every MoE variant and experts implementation."""
    return [
        variant if variant == "dense" else f"{variant}/{impl}"
        for variant in args.variants
        for impl in ([None] if variant == "dense" else args.experts_implementations)
    ]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(args)))
        return
    shape = selected_shape(args)
    memory = memory_check(shape, args.variants, args)
    rounds = run_rounds(configurations(args), args.rounds, lambda name: run_configuration(name, argv))
    summary = summarise(rounds)
    best = best_implementations(summary, args.variants, args.experts_implementations)
    device = torch.device(args.device)
    report = {
        **report_header("moiie_forward.py", argv, device, args.threads),
        "shape": {
            "name": args.shape,
            **asdict(shape),
            "dtype": "float32" if device.type == "cpu" else shape.dtype,
            "image_tokens": shape.image_tokens,
            "tokens_per_sample": 1 + shape.image_tokens + shape.text_tokens,
            "experts": "1 vision / 2 shared / 1 language (vanilla: 4), top-2; modality: top-1 by modality",
            "moe_layers": "odd decoder layers",
        },
        "parameters": memory["parameters"],
        "timing": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "iters": args.iters,
            "statistic": "median over rounds of the per-round median; ratios: median of per-round ratios",
            "train": "forward (+ balance losses) + backward + AdamW step; tokens = batch x tokens_per_sample",
            "decode": "greedy generate() with KV cache, batch x (new_tokens - 1) / time from first to last step",
        },
        "memory_method": (
            "fresh subprocess per configuration; CPU: peak resident set size (VmHWM, reset through "
            "/proc/self/clear_refs) during the timed passes minus the resident size before them, glibc "
            "MALLOC_MMAP_THRESHOLD_=65536; max_rss_mib: the worker's lifetime maximum (resource.getrusage); "
            "CUDA: max_memory_allocated minus allocated before the passes"
        ),
        "results": summary,
        "best_experts_implementation": best,
        "goals": goals(best),
    }
    write_report(report)


if __name__ == "__main__":
    main()

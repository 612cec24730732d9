# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Throughput and peak memory of per-sample WEMoE against a dense CLIP vision tower and a per-sample loop.

What is measured, on one randomly initialised vision tower whose every MLP is a weight-ensembling MoE
(pretrained MLP + `--num_tasks` task vectors, a 2-layer router per block initialised as METHODS.md says):

* inference: one forward pass (under `torch.inference_mode()`) of a batch (`--batch_size`, 64) of random images
  through `dense` (transformers' `CLIPVisionModel`, the same shape), `loop` (the reference kind: per-token router,
  token-averaged routing weights, then one `torch.func.functional_call` of the MLP per sample with its merged
  parameters theta_0 + sum_i r_i tau_i, as fusion-bench's `WeightEnsemblingMoE` does), `naive_batched` (the
  merged weights of every sample materialised as one [batch, out, in] tensor, then `bmm`) and `wemoe`
  (`WEMoECLIPVisionModel` of `modeling/modeling_we_moe.py`, when it can be imported);
* TTA step: forward + backward of the summed mean entropy over `--tta_tasks` (8) task batches of
  `--tta_batch_size` (16) images, only the routers trainable (zero-shot heads are random fixed matrices), for
  `loop`, `naive_batched` and `wemoe`.

All variants share the same weights (same seed); before timing, the outputs (and, for TTA, the router
gradients) of every variant are compared with the loop's at fp32 (`max_abs_diff`).

Timing: warm-up passes, then the median over `--iters` passes (`time.perf_counter`, synchronised on CUDA).
Peak memory: every variant runs in a FRESH subprocess. On CPU the figure is the peak resident set size during
the timed passes minus the resident size just before them (Linux `VmHWM`, reset through `/proc/self/clear_refs`
right before the passes, with glibc's mmap threshold fixed at 64 KiB so that freed memory leaves the resident
set; so it counts activations, merged weights and autograd buffers, not the weights the
variant holds, which are reported separately as `weights_mib`). On CUDA, `torch.cuda.max_memory_allocated`
minus the allocated memory before the passes.

One JSON object goes to stdout, progress to stderr:

    python benchmarks/we_moe_forward.py --shape tiny                 # seconds
    python benchmarks/we_moe_forward.py --shape b32 --layers 3       # ViT-B/32 blocks, 8 tasks, batch 64
"""

import argparse
import copy
import gc
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


# This script's folder is on sys.path when it runs as a script, not when a test loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import log, peak_since, report_header, reset_peak, run_worker, timed, write_report  # noqa: E402


SEED = 0
CHECK_BATCH_SIZE = 4
MLP_PARAMETERS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int


SHAPES = {
    "tiny": Shape(64, 256, 2, 4, 32, 8),
    "b32": Shape(768, 3072, 12, 12, 224, 32),
}


# ----------------------------------------------------------------------------------------------------------
# The shared weights: a dense tower, per block its MLP's task vectors and a router
# ----------------------------------------------------------------------------------------------------------


def vision_config(shape: Shape) -> CLIPVisionConfig:
    return CLIPVisionConfig(**asdict(shape), hidden_act="quick_gelu")


def build_dense(shape: Shape) -> CLIPVisionModel:
    torch.manual_seed(SEED)
    return CLIPVisionModel(vision_config(shape)).eval()


class Router(nn.Module):
    """The paper's depth-2 router: Linear(d, d) (std 0.01, bias 0) -> ReLU -> Linear(d, E) (std 0.01, bias
    init_lambda); per-token outputs, not softmaxed."""

    def __init__(self, hidden_size: int, num_tasks: int, init_lambda: float = 0.3):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, num_tasks)
        for layer, bias in ((self.fc1, 0.0), (self.fc2, init_lambda)):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(hidden_states)))


@torch.no_grad()
def build_task_vectors(dense: CLIPVisionModel, num_tasks: int) -> dict[str, torch.Tensor]:
    """Random task vectors `[E, ...]` per MLP parameter (std 0.1 x the parameter's, biases 0.01), keyed like
    `load_task_vectors` wants them (`encoder.layers.{i}.mlp.fc1.weight`, ...)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    vectors = {}
    for key, parameter in dense.encoder.named_parameters():
        if ".mlp." in key:
            std = 0.1 * parameter.std().item() if parameter.dim() > 1 else 0.01
            vectors[f"encoder.{key}"] = torch.randn((num_tasks, *parameter.shape), generator=generator) * std
    return vectors


def pretrained_mlps(dense: CLIPVisionModel) -> dict[str, torch.Tensor]:
    return {f"encoder.{k}": v.detach() for k, v in dense.encoder.named_parameters() if ".mlp." in k}


# ----------------------------------------------------------------------------------------------------------
# Reference MLPs: the per-sample loop and the naive batched merge
# ----------------------------------------------------------------------------------------------------------


class LoopWEMoEMLP(nn.Module):
    """The reference kind: token-averaged routing weights per sample, then one `functional_call` of the
    pretrained MLP per sample with theta_0 + sum_i r_i tau_i (fusion-bench's `WeightEnsemblingMoE.forward`)."""

    def __init__(self, mlp: nn.Module, task_vectors: dict[str, torch.Tensor], router: nn.Module):
        super().__init__()
        self.mlp = mlp.requires_grad_(False)
        self.router = router
        self.names = list(task_vectors)
        self.task_vectors = nn.ParameterList(nn.Parameter(v, requires_grad=False) for v in task_vectors.values())

    def routing_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.router(hidden_states.float()).mean(dim=1)  # [B, E]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(hidden_states)
        base = dict(self.mlp.named_parameters())
        outputs = []
        for sample in range(hidden_states.shape[0]):
            merged = {
                name: base[name] + torch.tensordot(weights[sample], tau, dims=1)
                for name, tau in zip(self.names, self.task_vectors)
            }
            outputs.append(torch.func.functional_call(self.mlp, merged, (hidden_states[sample : sample + 1],)))
        return torch.cat(outputs)


class NaiveBatchedWEMoEMLP(LoopWEMoEMLP):
    """Every sample's merged weights materialised at once ([B, out, in]) and applied with `bmm`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(hidden_states)
        base = dict(self.mlp.named_parameters())
        merged = {
            name: base[name] + torch.tensordot(weights, tau, dims=1) for name, tau in zip(self.names, self.task_vectors)
        }
        hidden = torch.baddbmm(merged["fc1.bias"][:, None], hidden_states, merged["fc1.weight"].transpose(1, 2))
        hidden = self.mlp.activation_fn(hidden)
        return torch.baddbmm(merged["fc2.bias"][:, None], hidden, merged["fc2.weight"].transpose(1, 2))


def reference_variant(dense: CLIPVisionModel, task_vectors, routers, cls) -> CLIPVisionModel:
    model = copy.deepcopy(dense)
    for index, layer in enumerate(model.encoder.layers):
        vectors = {name: task_vectors[f"encoder.layers.{index}.mlp.{name}"] for name in MLP_PARAMETERS}
        layer.mlp = cls(layer.mlp, vectors, routers[index])
    return model


def wemoe_class():
    """`WEMoECLIPVisionModel`, or `None` while `modeling/modeling_we_moe.py` does not provide it."""
    import hf_moe.modeling

    return getattr(hf_moe.modeling, "WEMoECLIPVisionModel", None)


@torch.no_grad()
def wemoe_variant(shape: Shape, num_tasks: int, dense, task_vectors, routers):
    """`WEMoECLIPVisionModel` holding the dense tower's weights, the task vectors and the routers' weights."""
    from hf_moe.modeling import WEMoEVisionConfig

    config = WEMoEVisionConfig(**asdict(shape), hidden_act="quick_gelu", num_tasks=num_tasks)
    model = wemoe_class()(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    assert not unexpected, unexpected
    per_task = [{key: stacked[task] for key, stacked in task_vectors.items()} for task in range(num_tasks)]
    model.load_task_vectors(pretrained_mlps(dense), per_task)
    for index, layer in enumerate(model.encoder.layers):
        _copy_router(routers[index], layer.mlp)
    return model


def _copy_router(router: Router, mlp: nn.Module):
    """Copy `router`'s two Linear layers into the WEMoE MLP's router (its first and last Linear modules)."""
    linears = [module for name, module in mlp.named_modules() if isinstance(module, nn.Linear) and "rout" in name]
    if len(linears) != 2:
        raise RuntimeError(f"cannot find the 2-layer router of {type(mlp).__name__}: {linears}")
    for source, target in zip((router.fc1, router.fc2), linears):
        target.weight.copy_(source.weight)
        target.bias.copy_(source.bias)


def build_variant(name: str, shape: Shape, num_tasks: int) -> nn.Module:
    dense = build_dense(shape)
    if name == "dense":
        return dense
    task_vectors = build_task_vectors(dense, num_tasks)
    torch.manual_seed(SEED + 2)
    routers = [Router(shape.hidden_size, num_tasks) for _ in range(shape.num_hidden_layers)]
    if name == "wemoe":
        return wemoe_variant(shape, num_tasks, dense, task_vectors, routers)
    cls = {"loop": LoopWEMoEMLP, "naive_batched": NaiveBatchedWEMoEMLP}[name]
    return reference_variant(dense, task_vectors, routers, cls).eval()


def router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if "rout" in name or "gate" in name]


def prepare_tta(model: nn.Module) -> list[nn.Parameter]:
    """Only the routers trainable."""
    model.requires_grad_(False)
    parameters = [p for _, p in router_parameters(model)]
    for p in parameters:
        p.requires_grad_(True)
    return parameters


# ----------------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------------


def random_images(shape: Shape, batch_size: int, device, seed: int = SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, shape.image_size, shape.image_size, generator=generator).to(device)


def tta_inputs(shape: Shape, tasks: int, batch_size: int, device):
    generator = torch.Generator().manual_seed(SEED + 3)
    heads = [torch.randn(shape.hidden_size, 10, generator=generator).to(device) for _ in range(tasks)]
    batches = [random_images(shape, batch_size, device, seed=SEED + 10 + t) for t in range(tasks)]
    return batches, heads


def tta_step(model: nn.Module, batches, heads) -> torch.Tensor:
    """Sum over tasks of the mean entropy of the (random-head) predictions; backward; no optimiser step."""
    loss = 0.0
    for pixel_values, head in zip(batches, heads):
        features = model(pixel_values=pixel_values).pooler_output
        probabilities = torch.softmax(10 * nn.functional.normalize(features, dim=-1) @ head, dim=-1)
        loss = loss + -(probabilities * torch.log(probabilities + 1e-8)).sum(-1).mean()
    loss.backward()
    return loss.detach()


def run_once(model, phase: str, inputs):
    if phase == "inference":
        with torch.inference_mode():
            return model(pixel_values=inputs).last_hidden_state
    for p in model.parameters():
        p.grad = None
    return tta_step(model, *inputs)


# ----------------------------------------------------------------------------------------------------------
# Measurement (in a fresh process per variant and phase)
# ----------------------------------------------------------------------------------------------------------


def measure(args) -> dict:
    name, phase = args._worker.split(":")
    device = torch.device(args.device)
    shape = selected_shape(args)
    model = build_variant(name, shape, args.num_tasks).to(device)
    if phase == "inference":
        inputs = random_images(shape, args.batch_size, device)
        images = args.batch_size
    else:
        prepare_tta(model)
        inputs = tta_inputs(shape, args.tta_tasks, args.tta_batch_size, device)
        images = args.tta_tasks * args.tta_batch_size
    for _ in range(args.warmup):
        run_once(model, phase, inputs)
    baseline = reset_peak(device)
    times = [1e3 * seconds for seconds in timed(device, lambda: run_once(model, phase, inputs), 0, args.iters)]
    median = statistics.median(times)
    return {
        "ms_per_step" if phase == "tta" else "ms_per_batch": median,
        "ms_all": times,
        "images_per_s": images / (median / 1e3),
        "peak_memory_mib": peak_since(device, baseline),
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def run_variant(name: str, phase: str, argv: list[str]) -> dict:
    log(f"[{phase}/{name}] fresh process: build, {phase} passes")
    result = run_worker(__file__, argv, f"{name}:{phase}")
    if "error" in result:
        return result
    key = "ms_per_step" if phase == "tta" else "ms_per_batch"
    log(f"[{phase}/{name}] {result[key]:.1f} ms, peak +{result['peak_memory_mib']:.0f} MiB")
    return result


# ----------------------------------------------------------------------------------------------------------
# Equality with the loop (in the parent process, small batches)
# ----------------------------------------------------------------------------------------------------------


def check_against_loop(names, shape: Shape, args) -> dict:
    device = torch.device(args.device)
    loop = build_variant("loop", shape, args.num_tasks).to(device)
    images = random_images(shape, CHECK_BATCH_SIZE, device, seed=SEED + 5)
    expected = run_once(loop, "inference", images)
    prepare_tta(loop)
    tta = tta_inputs(shape, 2, 2, device)
    run_once(loop, "tta", tta)
    expected_grads = [p.grad.clone() for _, p in router_parameters(loop)]
    del loop
    checks = {}
    for name in names:
        model = build_variant(name, shape, args.num_tasks).to(device)
        actual = run_once(model, "inference", images)
        prepare_tta(model)
        run_once(model, "tta", tta)
        grads = [p.grad for _, p in router_parameters(model)]
        if len(grads) != len(expected_grads) or any(a.shape != b.shape for a, b in zip(grads, expected_grads)):
            grad_diff = None  # the router parameters are not laid out like the reference's
        else:
            grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, expected_grads))
        checks[name] = {
            "batch_size": CHECK_BATCH_SIZE,
            "dtype": "float32",
            "max_abs_diff": (actual - expected).abs().max().item(),
            "router_grad_max_abs_diff": grad_diff,
            "tta_check": "2 tasks x 2 images",
        }
        log(f"[check/{name}] max abs diff vs loop {checks[name]['max_abs_diff']:.2e}, router grads {grad_diff}")
        del model
    return checks


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def selected_shape(args) -> Shape:
    shape = SHAPES[args.shape]
    if args.layers is not None:
        shape = Shape(**{**asdict(shape), "num_hidden_layers": args.layers})
    return shape


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="b32")
    parser.add_argument("--layers", type=int, help="number of blocks (default: the shape's; 12 for b32)")
    parser.add_argument("--num_tasks", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tta_tasks", type=int, default=8)
    parser.add_argument("--tta_batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["dense", "loop", "naive_batched", "wemoe"])
    parser.add_argument("--skip_tta", action="store_true")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        parser.error("--warmup must be >= 0 and --iters >= 1")
    return args


def add_ratios(results: dict, phase: str):
    key = "ms_per_step" if phase == "tta" else "ms_per_batch"
    loop = results.get("loop", {})
    dense = results.get("dense", {})
    for name, result in results.items():
        if key not in result:
            continue
        if dense.get(key):
            result["speed_vs_dense"] = dense[key] / result[key]
        if loop.get(key) and name != "loop":
            result["speed_vs_loop"] = loop[key] / result[key]
            if loop.get("peak_memory_mib"):
                result["peak_memory_vs_loop"] = result["peak_memory_mib"] / loop["peak_memory_mib"]


def goals(inference: dict, tta: dict) -> dict:
    wemoe, wemoe_tta = inference.get("wemoe", {}), tta.get("wemoe", {})
    return {
        "inference_speed_vs_loop >= 2": wemoe.get("speed_vs_loop"),
        "inference_speed_vs_dense >= 0.3": wemoe.get("speed_vs_dense"),
        "tta_peak_memory_vs_loop <= 1/3": wemoe_tta.get("peak_memory_vs_loop"),
        "met": bool(
            wemoe.get("speed_vs_loop", 0) >= 2
            and wemoe.get("speed_vs_dense", 0) >= 0.3
            and wemoe_tta.get("peak_memory_vs_loop", 1) <= 1 / 3
        ),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(args)))
        return
    shape = selected_shape(args)
    names = [n for n in args.variants if n != "wemoe" or wemoe_class() is not None]
    if "wemoe" in args.variants and "wemoe" not in names:
        log("hf_moe.modeling has no WEMoECLIPVisionModel yet: the wemoe variant is skipped")
    torch.manual_seed(SEED)
    checks = check_against_loop([n for n in names if n not in ("dense", "loop")], shape, args)
    gc.collect()
    inference = {name: run_variant(name, "inference", argv) for name in names}
    add_ratios(inference, "inference")
    tta = {}
    if not args.skip_tta:
        tta = {name: run_variant(name, "tta", argv) for name in names if name != "dense"}
        add_ratios(tta, "tta")
    report = {
        **report_header("we_moe_forward.py", argv, torch.device(args.device)),
        "shape": {"name": args.shape, **asdict(shape), "num_tasks": args.num_tasks, "router_depth": 2},
        "inference_batch_size": args.batch_size,
        "tta": {"tasks": args.tta_tasks, "batch_size_per_task": args.tta_batch_size, "trainable": "routers only"},
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median", "dtype": "float32"},
        "memory_method": (
            "fresh subprocess per variant and phase; CPU: peak resident set size (VmHWM, reset through "
            "/proc/self/clear_refs) during the timed passes minus the resident size before them, glibc "
            "MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave the resident set, i.e. activations, "
            "merged weights and autograd buffers on top of the weights; CUDA: max_memory_allocated minus allocated"
        ),
        "checks_vs_loop": checks,
        "inference": inference,
        "tta_step": tta,
        "goals": goals(inference, tta),
    }
    write_report(report)


if __name__ == "__main__":
    main()

# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""How the benchmarks in this folder measure: timed passes, peak memory, fresh worker processes run in interleaved
rounds with ratios taken per round, and the JSON report's common fields.

A script imports it by name (`from measuring import ...`) after putting its own folder on `sys.path`, so that it
works both when run as `python benchmarks/<script>.py` and when a test loads the script by path.

Why rounds: on a shared machine the speed drifts by 2x over minutes, so variants timed one after another are
compared under different loads. Run every configuration once per round, in the same order each round, and take each
ratio within a round (`ratios_per_round`) before taking the median over rounds: the drift then cancels out.
"""

import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers


# Allocations of 64 KiB and more are mmap'ed and handed back on free (no dynamic threshold), so that a worker's
# resident size follows its live memory instead of keeping freed heap from the warm-up passes.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def log(message: str):
    """Progress goes to stderr: stdout holds the JSON only."""
    print(message, file=sys.stderr, flush=True)


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


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of `function`, after `warmup` untimed calls; on CUDA the device is
    synchronised around every timed call, so that a time covers the queued work."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def current_rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: the kernel updates the latter lazily, so it can read below the current VmRSS.
    return _status_kib("VmHWM") / 1024


def max_rss_mib() -> float:
    """The process's lifetime maximum resident size (getrusage), which `reset_peak` does not reset."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes in use now, the baseline `peak_since` subtracts.
    CPU: the peak resident size (VmHWM) is reset to the current one; CUDA: the allocator's peak statistics."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM (the peak resident size) to the current resident size
    return _status_kib("VmRSS") * 1024


def peak_since(device: torch.device, baseline: int) -> float:
    """MiB of the peak since `reset_peak` above the `baseline` it returned."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return (_status_kib("VmHWM") * 1024 - baseline) / 2**20


# ----------------------------------------------------------------------------------------------------------
# Fresh worker processes and interleaved rounds
# ----------------------------------------------------------------------------------------------------------


def run_worker(script: str | Path, argv: list[str], worker: str, tail_lines: int = 3) -> dict:
    """Run `script` with `argv` plus `--_worker WORKER` in a fresh interpreter (with `WORKER_ENV`), and return the
    JSON object its stdout ends with; a failed worker gives `{"error": ...}` with the end of its stderr."""
    command = [sys.executable, str(Path(script).resolve()), *argv, "--_worker", worker]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **WORKER_ENV})
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-tail_lines:]
        return {"error": f"exit status {done.returncode} (killed for memory if -9): " + " | ".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(names: list[str], rounds: int, run: Callable[[str], dict]) -> list[dict]:
    """`run(name)` for every name, in the same order, `rounds` times over: one `{name: result}` per round."""
    results = []
    for index in range(rounds):
        log(f"round {index + 1}/{rounds}")
        results.append({name: run(name) for name in names})
    return results


def ratios_per_round(rounds: list[dict], name: str, reference: str, value: Callable[[dict], float | None]):
    """`value(name's result) / value(reference's result)` within each round, or None when either is missing in a
    round (an error, a phase not run)."""
    ratios = []
    for results in rounds:
        numerator = value(results.get(name, {}))
        denominator = value(results.get(reference, {}))
        if not numerator or not denominator:
            return None
        ratios.append(numerator / denominator)
    return ratios


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------


def report_header(script: str, argv: list[str], device: torch.device, num_threads: int | None = None) -> dict:
    """The fields every report opens with: when, the command that reproduces it, and on what."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/{script} " + " ".join(argv),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_threads": num_threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def write_report(report: dict, output: str | Path | None = None) -> str:
    """Print the report as indented JSON to stdout and, with `output`, write it there too; returns the text."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    return text

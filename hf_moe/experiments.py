"""What the demos and the small CPU experiments in `examples/` share: a quiet run of tiny models, a work folder,
mean +- sample std over seeds, and a fresh interpreter in which hf_moe cannot be imported."""

import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch
from transformers.utils import logging


# Opens a script run in a fresh interpreter where importing hf_moe fails, as on the machine of a Hub user who has only
# transformers: a model saved by hf-moe must then load from its folder's own code. The tests run their fresh-process
# checks behind the same lines. `sys` stays imported for the script that follows.
BLOCK_HF_MOE = """
import importlib.abc, sys

class NoHfMoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_moe":
            raise ImportError("hf_moe is not installed for this user")

sys.meta_path.insert(0, NoHfMoe())
"""


@contextmanager
def quiet_tiny_run() -> Iterator[None]:
    """transformers logs errors only, progress bars are off and torch uses one thread, restored on exit: the
    Trainer's notices and per-load bars would drown a demo's tour, and tiny models gain little from a second thread
    while threads waiting on each other on busy cores make a step up to 20x slower."""
    verbosity, threads = logging.get_verbosity(), torch.get_num_threads()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
        datasets.enable_progress_bars()
        torch.set_num_threads(threads)


@contextmanager
def experiment_workspace(work_dir: str | Path | None, prefix: str) -> Iterator[Path]:
    """The experiment's work folder, inside `quiet_tiny_run`: `work_dir` (new or empty, kept) or a temporary one
    (removed afterwards)."""
    temporary = work_dir is None
    folder = Path(tempfile.mkdtemp(prefix=prefix) if temporary else work_dir)
    if not temporary and folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"--work_dir {folder} is not empty; give a new folder.")
    try:
        with quiet_tiny_run():
            yield folder
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)


def mean_std(values: list[float]) -> dict:
    """`{"mean", "std"}` of per-seed values; `std` is the sample standard deviation, None for a single seed."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std}


def format_mean_std(stats: dict, scale: float = 1.0, digits: int = 3) -> str:
    """`mean ± std` of a `mean_std` result, both times `scale` (100 for percentages)."""
    text = f"{scale * stats['mean']:.{digits}f}"
    return text + (f" ± {scale * stats['std']:.{digits}f}" if stats["std"] is not None else "")


def run_as_hub_user(script: str, args: list, model_dir) -> dict:
    """Run `script` after `BLOCK_HF_MOE` in a fresh interpreter, `args` its `sys.argv[1:]`, and return the JSON
    object its last line of output holds; a `RuntimeError` with its stderr when loading `model_dir` there fails."""
    child = subprocess.run(
        [sys.executable, "-c", BLOCK_HF_MOE + script, *map(str, args)], capture_output=True, text=True
    )
    if child.returncode != 0:
        raise RuntimeError(f"Loading {model_dir} without hf_moe failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])

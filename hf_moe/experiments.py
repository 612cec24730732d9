"""What the demos and the small CPU experiments in `examples/` share: a quiet run of tiny models, a work folder, and
mean +- sample std over seeds."""

import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch
from transformers.utils import logging


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

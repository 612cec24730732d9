"""Local `evaluate` metric scripts shipped with hf-moe, so evaluation needs no Hub access.

Each metric is a script folder `<name>/<name>.py` holding an `evaluate.Metric`, the layout `evaluate.load`
takes for a local path. The folders are not Python packages (no `__init__.py`): `evaluate` copies the script
into its own modules cache and imports it from there. `evaluate.load` on an existing local file path never
contacts the Hub, so no offline flag is needed.
"""

from pathlib import Path


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "mean_per_class_accuracy", "recall_at_k")


def metric_path(name: str) -> Path:
    """Path of the shipped metric script `name` (one of `METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown hf-moe metric '{name}'; available: {', '.join(METRIC_NAMES)}.")
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"The metric script {path} is missing from the installed hf-moe package (was it installed without "
            "its package data?)."
        )
    return path


def load_metric(name: str, **kwargs):
    """`evaluate.load` of the shipped metric script `name`, kept in memory (no cache files) unless told otherwise."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)

"""`hf-moe analyze-routing`'s report: figures, `routing.json` and `routing.md`, shared by every family.

A family's `hf_moe/<family>/routing.py` runs its model on the data and returns a `RoutingReport` (its numbers and its
figures as `Heatmap` / `StackedBars` / `Spread` records); `write_routing_report` draws each figure to a PNG (matplotlib,
Agg backend, imported only here and only when drawing), writes every plotted number to `routing.json` and a short
`routing.md` embedding the figures, all into a temporary folder renamed into place (`hf_moe.fileio`), so an output
folder is either complete or absent. Each PNG stores its title in its text metadata ("Title"), so a test (or a
reader) can check which figure a file is without looking at its pixels.

This module imports no family and no torch.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


ROUTING_JSON = "routing.json"
ROUTING_MD = "routing.md"
# Cells are annotated with their values only while there are few enough to read.
MAX_ANNOTATED_CELLS = 400


@dataclass
class Heatmap:
    """A matrix drawn as a heatmap (`matrix[r][c]`: row `row_labels[r]`, column `column_labels[c]`); one PNG."""

    name: str  # file stem ({name}.png) and key in routing.json["figures"]
    title: str
    matrix: list[list[float]]
    row_labels: list[str]
    column_labels: list[str]
    xlabel: str
    ylabel: str
    caption: str = ""  # one sentence under the figure in routing.md
    value_format: str = ".2f"  # cell annotations (small matrices only)


@dataclass
class StackedBars:
    """One bar per category, one stacked segment per series (`series[label][i]`: its value for `categories[i]`)."""

    name: str
    title: str
    categories: list[str]
    series: dict[str, list[float]]
    xlabel: str
    ylabel: str
    caption: str = ""
    # Per category a group name, drawn as a coloured band under the bars with a legend (MoIIE: "vision-only",
    # "shared", "language-only").
    category_groups: list[str] | None = None


@dataclass
class Spread:
    """The distribution of values per position and group (`groups[g][p]`: the values of group g at `positions[p]`),
    drawn as side-by-side box plots per position."""

    name: str
    title: str
    positions: list[str]
    groups: dict[str, list[list[float]]]
    xlabel: str
    ylabel: str
    caption: str = ""


FIGURE_KINDS = {Heatmap: "heatmap", StackedBars: "stacked_bars", Spread: "spread"}


@dataclass
class RoutingReport:
    """What a family's `analyze_routing` returns; `write_routing_report` writes it."""

    model: str  # as given on the command line
    model_type: str
    data: str  # as given; routing.md names it
    data_description: str  # one line: what the data is ("3 task folders, 64 images each")
    num_samples: int
    numbers: dict  # the family's numbers (JSON-serialisable), beyond the figures' own data
    figures: list  # Heatmap | StackedBars | Spread
    notes: list[str] = field(default_factory=list)  # extra lines for routing.md


@dataclass
class RoutingArguments:
    """`hf-moe analyze-routing` options, shared by every family (each reads the ones it needs)."""

    model: str = field(metadata={"help": "hf-moe model folder or Hub id (CLIP-MoE, WEMoE, MoIIE or MoDE)."})
    data: str = field(
        metadata={
            "help": "What to route: CLIP-MoE: class folders, a captioned image folder or any data hf-moe eval reads; "
            "WEMoE: a folder of task folders (as tta-wemoe reads them) or one class folder; MoIIE: a conversation "
            "JSON; MoDE: class folders or a captioned folder."
        }
    )
    output_dir: str = field(metadata={"help": "Folder for routing.json, routing.md and the PNGs (new or empty)."})
    split: str | None = field(default=None, metadata={"help": "Split, when the data has several."})
    batch_size: int = field(default=16, metadata={"help": "Samples per forward pass."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Route at most this many samples per class / task / file (a quick look)."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device to run on (cpu, cuda, cuda:1, mps; default: cuda if available)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Model dtype (float32, bfloat16, float16; default: as saved).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow --model to run model code from its folder or Hub repo."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    image_folder: str | None = field(
        default=None, metadata={"help": "MoIIE: folder of the conversation JSON's images (default: next to it)."}
    )
    clusters: str | None = field(
        default=None, metadata={"help": "MoDE: the hf-moe mode cluster folder (pairs and fine clusters per expert)."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "MoDE: the tasks' class names as hf-moe eval zero-shot takes them (optional)."},
    )
    blocks: list[int] | None = field(
        default=None,
        metadata={
            "help": "CLIP-MoE: the MoE blocks (encoder layer indices) whose classes x experts heatmaps are drawn "
            "(default: the first and last MoE block of each tower; routing.json holds every block).",
            "nargs": "+",
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# Helpers for the families
# ----------------------------------------------------------------------------------------------------------------


def check_routing_output_dir(args: RoutingArguments) -> Path:
    """Refuse a non-empty output folder (without --overwrite_output_dir), or one that holds the model or the data,
    before any model is loaded."""
    from .fileio import check_output_dir

    folder = Path(args.output_dir)
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite_output_dir:
        raise FileExistsError(
            f"Output folder {folder} is not empty; pass --overwrite_output_dir to replace it (nothing was written)."
        )
    return check_output_dir(args.output_dir, args.overwrite_output_dir, inputs=[args.model, args.data])


def first_per_group(groups: list, max_samples: int | None) -> list[int]:
    """The indices of the first `max_samples` items of each group (`groups[i]`: item i's group), in order; all of
    them when `max_samples` is None (`--max_samples`: per class / task)."""
    if max_samples is None:
        return list(range(len(groups)))
    if max_samples < 1:
        raise ValueError(f"--max_samples must be at least 1, got {max_samples}.")
    seen: dict = {}
    kept = []
    for index, group in enumerate(groups):
        if seen.get(group, 0) < max_samples:
            seen[group] = seen.get(group, 0) + 1
            kept.append(index)
    return kept


def batch_ranges(count: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def balance_ratio(shares: list[float]) -> float:
    """max / min of the experts' shares (1 = perfectly balanced; inf when an expert gets nothing)."""
    low, high = min(shares), max(shares)
    if low <= 0:
        return math.inf if high > 0 else 1.0
    return high / low


def format_ratio(ratio: float) -> str:
    return "inf" if math.isinf(ratio) else f"{ratio:.2f}"


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _figure_kind(figure) -> str:
    try:
        return FIGURE_KINDS[type(figure)]
    except KeyError:
        raise TypeError(f"Not a routing figure: {type(figure).__name__} (Heatmap, StackedBars or Spread).") from None


def _json_number(value):
    """JSON has no inf / nan: they are written as strings ("inf", "-inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist())
    return _json_number(value)


def report_json(report: RoutingReport) -> dict:
    """The content of routing.json."""
    figures = {}
    for figure in report.figures:
        entry = {"kind": _figure_kind(figure), "file": f"{figure.name}.png"}
        entry.update(dataclasses.asdict(figure))
        figures[figure.name] = _jsonable(entry)
    return {
        "model": report.model,
        "model_type": report.model_type,
        "data": report.data,
        "data_description": report.data_description,
        "num_samples": report.num_samples,
        "numbers": _jsonable(report.numbers),
        "figures": figures,
        "notes": list(report.notes),
    }


def report_markdown(report: RoutingReport) -> str:
    """The content of routing.md."""
    lines = [
        f"# Routing of `{report.model}`",
        "",
        f"- Model: `{report.model}` (model_type `{report.model_type}`)",
        f"- Data: `{report.data}`: {report.data_description} ({report.num_samples} samples routed)",
        f"- Every plotted number is in [{ROUTING_JSON}]({ROUTING_JSON}).",
    ]
    if report.notes:
        lines += ["", *[f"{note}" for note in report.notes]]
    for figure in report.figures:
        lines += ["", f"## {figure.title}", "", f"![{figure.title}]({figure.name}.png)", ""]
        if figure.caption:
            lines.append(figure.caption)
    return "\n".join(lines).rstrip() + "\n"


def check_matplotlib() -> None:
    """Refuse at once, before any model is loaded, when matplotlib (the `analysis` extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise OSError(
            "hf-moe analyze-routing draws its figures with matplotlib, which is not installed: "
            "pip install 'hf-moe[analysis]' (or pip install matplotlib)."
        )


def _pyplot():
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display needed, never opens a window
    import matplotlib.pyplot as plt

    return plt


def _wrap(title: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def _draw_heatmap(plt, figure: Heatmap):
    rows, columns = len(figure.row_labels), len(figure.column_labels)
    width = min(max(6.5, 4 + 0.55 * columns), 24)
    height = min(2.5 + 0.4 * rows, 24)
    fig, ax = plt.subplots(figsize=(width, height))
    values = [[math.nan if value is None else float(value) for value in row] for row in figure.matrix]
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(
        range(columns), figure.column_labels, rotation=45 if columns > 8 else 0, ha="right" if columns > 8 else "center"
    )
    ax.set_yticks(range(rows), figure.row_labels)
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(figure.ylabel)
    if rows * columns <= MAX_ANNOTATED_CELLS:
        finite = [value for row in values for value in row if math.isfinite(value)]
        middle = (min(finite) + max(finite)) / 2 if finite else 0.0
        for r, row in enumerate(values):
            for c, value in enumerate(row):
                if math.isfinite(value):
                    colour = "black" if value > middle else "white"
                    ax.text(
                        c, r, format(value, figure.value_format), ha="center", va="center", fontsize=7, color=colour
                    )
    return fig, ax


def _draw_stacked_bars(plt, figure: StackedBars):
    count = len(figure.categories)
    fig, ax = plt.subplots(figsize=(min(4 + 0.5 * count, 24), 4.5))
    bottoms = [0.0] * count
    for label, values in figure.series.items():
        ax.bar(range(count), values, bottom=bottoms, label=label)
        bottoms = [bottom + value for bottom, value in zip(bottoms, values)]
    ax.set_xticks(range(count), figure.categories, rotation=45 if count > 8 else 0)
    if figure.category_groups:
        # A coloured band under the bars per group (a legend names the groups).
        groups = list(dict.fromkeys(figure.category_groups))
        colours = plt.get_cmap("Set2")
        top = max(bottoms, default=1.0) or 1.0
        band = -0.04 * top
        for index, group in enumerate(figure.category_groups):
            ax.bar(index, band, width=1.0, color=colours(groups.index(group)), alpha=0.9)
        from matplotlib.patches import Patch

        handles, _ = ax.get_legend_handles_labels()
        handles += [Patch(color=colours(i), label=group) for i, group in enumerate(groups)]
        ax.legend(handles=handles, fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(figure.ylabel)
    return fig, ax


def _draw_spread(plt, figure: Spread):
    positions = len(figure.positions)
    groups = list(figure.groups)
    fig, ax = plt.subplots(figsize=(min(4 + 0.9 * positions * max(len(groups), 1) ** 0.5, 24), 4.5))
    width = 0.8 / max(len(groups), 1)
    colours = plt.get_cmap("tab10")
    for g, group in enumerate(groups):
        spots = [p - 0.4 + width * (g + 0.5) for p in range(positions)]
        data = [values if values else [math.nan] for values in figure.groups[group]]
        boxes = ax.boxplot(data, positions=spots, widths=width * 0.9, patch_artist=True, medianprops={"color": "black"})
        for box in boxes["boxes"]:
            box.set_facecolor(colours(g % 10))
            box.set_alpha(0.7)
        ax.plot([], [], color=colours(g % 10), linewidth=6, label=group)
    ax.set_xticks(range(positions), figure.positions, rotation=45 if positions > 8 else 0)
    ax.set_xlim(-0.6, positions - 0.4)
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(figure.ylabel)
    ax.legend(fontsize=8, title=None)
    return fig, ax


_DRAW = {"heatmap": _draw_heatmap, "stacked_bars": _draw_stacked_bars, "spread": _draw_spread}


def draw_figure(figure, path: str | os.PathLike) -> Path:
    """Draw `figure` to the PNG `path`; its title is drawn and stored in the PNG's text metadata ("Title")."""
    plt = _pyplot()
    fig, ax = _DRAW[_figure_kind(figure)](plt, figure)
    try:
        # About 9 characters of a 10-point title per inch: wrapped to the figure's width, never cut off.
        ax.set_title(_wrap(figure.title, max(30, int(fig.get_figwidth() * 9))), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100, metadata={"Title": figure.title, "Software": "hf-moe analyze-routing"})
    finally:
        plt.close(fig)
    return Path(path)


def check_report(report: RoutingReport) -> None:
    """Refuse a report whose figures cannot be written: duplicate or unsafe names, ragged data."""
    names = [figure.name for figure in report.figures]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Routing figures must have distinct names; {duplicates} appear more than once.")
    for figure in report.figures:
        _figure_kind(figure)
        if not figure.name or "/" in figure.name or figure.name.startswith(".") or figure.name in ("routing",):
            raise ValueError(f"Figure name {figure.name!r} cannot be a file name (no '/', no leading '.').")
        if isinstance(figure, Heatmap):
            if len(figure.matrix) != len(figure.row_labels) or any(
                len(row) != len(figure.column_labels) for row in figure.matrix
            ):
                raise ValueError(
                    f"Heatmap '{figure.name}': the matrix must be {len(figure.row_labels)} rows x "
                    f"{len(figure.column_labels)} columns (its labels)."
                )
        elif isinstance(figure, StackedBars):
            if any(len(values) != len(figure.categories) for values in figure.series.values()):
                raise ValueError(f"StackedBars '{figure.name}': every series needs one value per category.")
            if figure.category_groups is not None and len(figure.category_groups) != len(figure.categories):
                raise ValueError(f"StackedBars '{figure.name}': category_groups needs one group per category.")
        elif any(len(values) != len(figure.positions) for values in figure.groups.values()):
            raise ValueError(f"Spread '{figure.name}': every group needs one list of values per position.")


def write_routing_report(report: RoutingReport, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `routing.json`, one PNG per figure and `routing.md` to `output_dir`, atomically: a temporary sibling
    folder renamed into place once complete (nothing half-written on error). Refuses a non-empty `output_dir`
    unless `overwrite`, and a folder another run is writing (`hf_moe.fileio.OutputFolderLocked`)."""
    from .fileio import atomic_output_dir

    check_report(report)
    folder = Path(output_dir)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {folder} is not empty; pass --overwrite_output_dir (overwrite=True) to replace it."
        )
    content = json.dumps(report_json(report), indent=2, allow_nan=False)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        for figure in report.figures:
            draw_figure(figure, tmp / f"{figure.name}.png")
        (tmp / ROUTING_JSON).write_text(content + "\n", encoding="utf-8")
        (tmp / ROUTING_MD).write_text(report_markdown(report), encoding="utf-8")
    return Path(output_dir)


__all__ = [
    "Heatmap",
    "RoutingArguments",
    "RoutingReport",
    "Spread",
    "StackedBars",
    "balance_ratio",
    "batch_ranges",
    "check_report",
    "draw_figure",
    "report_json",
    "report_markdown",
    "write_routing_report",
]

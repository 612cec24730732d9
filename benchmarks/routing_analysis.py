# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Wall time and peak resident memory of `hf-moe analyze-routing` on every family at the papers' real widths, on
random weights, in bfloat16 and float32, with a check of the routing.json it writes.

Cases (`--cases`, default all), each model the output of benchmarks/conversion.py's converter case at reduced
depth (`--layers`, default 2 blocks per tower / decoder):

* `clip_l14_classes`: CLIP-MoE ViT-L/14 (`upcycle-clip`, 4 experts, top-2) on digit class folders (vision tower,
  classes x experts per block);
* `clip_l14_captions`: the same model on a captioned digit folder (both towers);
* `wemoe_b32_8`: WEMoE of CLIP ViT-B/32 + 8 vision fine-tunes (`merge-wemoe`) on a folder of task folders named
  like two of its stored tasks;
* `moiie_phi3_siglip`: MoIIE of Phi-3-mini + SigLIP-so400m-384 (`upcycle-moiie`) on a digit conversation JSON
  (image questions and text-only questions, as the MoIIE demo writes them);
* `mode_b32_4`: MoDE of 4 CLIP ViT-B/32 experts with 1024 fine clusters (`mode build`) on the MoDE demo's tasks
  JSON, with its clusters folder.

The inputs of the converters are benchmarks/conversion.py's (generated there, once, into its `--work_dir`, which
this script shares); each model is converted once into this script's `--work_dir` and reused. Data: a few digit
images from hf_moe.toy_data (`--samples` per case, MoIIE at most 8), written once.

Measurement: `hf-moe analyze-routing ... --device cpu --dtype DTYPE` as its console command in a fresh process,
offline, under `/usr/bin/time -v` (conversion.py's `run_measured`): `peak_rss_bytes` is the peak resident set size
of that process; `samples_per_s` the samples routed (routing.json's `num_samples`) over the wall time, which
includes the interpreter start and the model load (`interpreter_baseline` is `python -c "import torch,
transformers, hf_moe.cli"`). `check` verifies routing.json: every share / weight array has the model's shape
(blocks x experts, tasks x task vectors, ...), shares sum to 1 per block (per modality for MoIIE, per task for
MoDE), every number is finite, and every figure listed was written and decodes. `bf16_vs_fp32` is the largest
absolute difference of the checked numbers between the two dtypes' runs.

One JSON object goes to stdout (and to `--output`), progress to stderr:

    python benchmarks/routing_analysis.py --output benchmarks/results/routing_analysis_cpu.json
    python benchmarks/routing_analysis.py --cases wemoe_b32_8 --dtypes bfloat16 --layers 12
"""

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


# This script's folder is on sys.path when it runs as a script, not when a test loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import conversion  # noqa: E402, I001  (conversion.py, this folder's sibling: not a package)
from measuring import device_name, log, write_report  # noqa: E402


COMPLETE = ".complete"


# ----------------------------------------------------------------------------------------------------------
# Data (written once per sample count)
# ----------------------------------------------------------------------------------------------------------


def digit_classes(folder: Path, samples: int, model_dir: Path, clusters: Path) -> list[str]:
    from hf_moe.toy_data import save_digit_class_folders

    save_digit_class_folders(folder, samples)
    return []


def digit_captions(folder: Path, samples: int, model_dir: Path, clusters: Path) -> list[str]:
    from hf_moe.toy_data import save_digit_caption_folder

    save_digit_caption_folder(folder, count=samples)
    return []


def wemoe_tasks(folder: Path, samples: int, model_dir: Path, clusters: Path) -> list[str]:
    """Two task folders named like the model's first two stored tasks (so that own_task_accuracy is reported)."""
    from hf_moe.toy_data import save_digit_class_folders

    config = json.loads((model_dir / "config.json").read_text())
    names = config.get("task_names") or config.get("vision_config", {}).get("task_names") or ["task_a", "task_b"]
    half = max(samples // 2, 1)
    for index, name in enumerate(names[:2]):
        save_digit_class_folders(folder / name, half, 32, index * half)
    return []


def moiie_conversations(folder: Path, samples: int, model_dir: Path, clusters: Path) -> list[str]:
    """A LLaVA-format conversation JSON, as the MoIIE demo writes it: digit image questions (two kinds) and a few
    text-only questions."""
    from hf_moe.moiie.toy import IMAGE_QUESTIONS, TEXT_QUESTIONS, save_digit_questions

    kinds = list(IMAGE_QUESTIONS)[:2]
    text_only = 1 if samples <= 8 else 2  # per text question kind
    images = max((samples - text_only * len(TEXT_QUESTIONS)) // len(kinds), 1)
    save_digit_questions(folder / "data.json", folder / "images", range(images), kinds, 32, text_only)
    return ["--image_folder", str(folder / "images")]


MODE_PAIRS = 4096  # the clusters folder's assignments (`hf-moe mode cluster` writes one row per training pair)


def mode_tasks(folder: Path, samples: int, model_dir: Path, clusters: Path) -> list[str]:
    """The MoDE demo's routing tasks (class names and templates) as a tasks JSON, and a copy of the converter's
    clusters folder with `MODE_PAIRS` assignments (round-robin over the fine clusters), as `hf-moe mode cluster`
    writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from hf_moe.mode.demo import ROUTING_TASKS

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.json").write_text(json.dumps(ROUTING_TASKS, indent=1) + "\n")
    shutil.copytree(clusters, folder / "clusters", ignore=shutil.ignore_patterns(COMPLETE))
    fine_to_coarse = load_file(folder / "clusters" / "centers.safetensors")["fine_to_coarse"]
    fine = torch.arange(MODE_PAIRS) % len(fine_to_coarse)
    table = {"key": [f"pair{i}" for i in range(MODE_PAIRS)], "fine": fine.tolist(),
             "coarse": fine_to_coarse[fine].tolist()}  # fmt: skip
    (folder / "clusters" / "assignments").mkdir()
    pq.write_table(pa.table(table), folder / "clusters" / "assignments" / "part-00000.parquet")
    return ["--clusters", str(folder / "clusters")]


@dataclass(frozen=True)
class RoutingCase:
    description: str
    conversion_case: str  # benchmarks/conversion.py's case that builds the model
    data: str  # the data's name under WORK/data/
    write_data: object  # (folder, samples, model_dir, mode clusters) -> extra analyze-routing arguments
    data_path: str = "."  # --data, relative to the data folder
    family: str = ""
    max_samples: int | None = None  # a cap on --samples for a case whose samples are costly


CASES = {
    "clip_l14_classes": RoutingCase(
        "CLIP-MoE ViT-L/14 (4 experts, top-2) on digit class folders", "clip_l14_sparse", "digit_classes",
        digit_classes, family="clip_moe",
    ),
    "clip_l14_captions": RoutingCase(
        "CLIP-MoE ViT-L/14 (4 experts, top-2) on a captioned digit folder (both towers)", "clip_l14_sparse",
        "digit_captions", digit_captions, family="clip_moe",
    ),
    "wemoe_b32_8": RoutingCase(
        "WEMoE, CLIP ViT-B/32 + 8 task vectors, on two task folders", "wemoe_b32_8", "wemoe_tasks", wemoe_tasks,
        family="we_moe",
    ),
    "moiie_phi3_siglip": RoutingCase(
        "MoIIE, Phi-3-mini + SigLIP-so400m-384 (1 vision / 2 shared / 1 language experts), on digit conversations",
        "moiie_phi3_siglip", "moiie_conversations", moiie_conversations, "data.json", family="moiie",
        # a 384-px image is 729 vision tokens through the 3072-wide decoder (about 0.4 GFLOP per token and layer):
        # 6 image questions and 2 text-only ones take minutes on 2 cores in bf16 (emulated without AVX-512 BF16)
        max_samples=8,
    ),
    "mode_b32_4": RoutingCase(
        "MoDE, 4 CLIP ViT-B/32 experts, 1024 fine clusters, on the MoDE demo's five tasks", "mode_b32_4",
        "mode_tasks", mode_tasks, "tasks.json", family="mode",
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Models: conversion.py's converters, run once
# ----------------------------------------------------------------------------------------------------------


def ensure_model(conversion_case: str, conversion_root: Path, models_root: Path, setting) -> tuple[Path, dict]:
    """The converted model of `conversion_case` (converted now unless cached) and the conversion's measurement."""
    folder = models_root / conversion_case
    info_path = folder / COMPLETE
    if info_path.is_file():
        return folder, json.loads(info_path.read_text() or "{}")
    paths, _ = conversion.prepare_inputs(conversion_case, conversion_root, setting)
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    argv = conversion.CASES[conversion_case].command(paths, str(folder))
    log(f"[models] hf-moe {' '.join(argv[:2])} -> {folder}")
    result = conversion.run_measured([*conversion.hf_moe_command(), *argv], models_root / f"{conversion_case}.log")
    if "error" in result:
        raise RuntimeError(f"converting {conversion_case} failed: {result['error']}")
    info = {"command": conversion.short_command(argv), "wall_s": result["wall_s"],
            "weight_bytes": conversion.weight_bytes([folder])}  # fmt: skip
    info_path.write_text(json.dumps(info))
    return folder, info


def ensure_data(case: RoutingCase, data_root: Path, samples: int, model_dir: Path, clusters: Path):
    folder = data_root / f"{case.data}-{samples}"
    args_path = folder / COMPLETE
    if args_path.is_file():
        return folder / case.data_path, json.loads(args_path.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    extra = case.write_data(folder, samples, model_dir, clusters)
    args_path.write_text(json.dumps(extra))
    return folder / case.data_path, extra


# ----------------------------------------------------------------------------------------------------------
# routing.json checks: shapes, sums, finiteness, figures
# ----------------------------------------------------------------------------------------------------------


def _shape(value) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def _flat(value) -> list[float]:
    if isinstance(value, list):
        return [x for item in value for x in _flat(item)]
    return [float(value)]


def _rows(value) -> list[list[float]]:
    """The innermost lists of a nested list."""
    if value and isinstance(value[0], list):
        return [row for item in value for row in _rows(item)]
    return [value]


class Checker:
    def __init__(self):
        self.problems: list[str] = []
        self.checked: dict[str, list] = {}  # name -> nested list (compared across dtypes)

    def array(self, name: str, value, shape: list[int], sums_to_one: bool = False, tol: float = 1e-4):
        self.checked[name] = value
        if _shape(value) != shape:
            self.problems.append(f"{name}: shape {_shape(value)}, expected {shape}")
            return
        if not all(math.isfinite(x) for x in _flat(value)):
            self.problems.append(f"{name}: non-finite values")
        if sums_to_one:
            worst = max(abs(sum(row) - 1) for row in _rows(value))
            if worst > tol:
                self.problems.append(f"{name}: a row sums to 1 {'+-'} {worst:.2e} (> {tol:g})")


def model_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def check_clip_moe(numbers: dict, config: dict, checker: Checker, case: str):
    towers = ["vision"] if case == "clip_l14_classes" else ["vision", "text"]
    if sorted(numbers["towers"]) != sorted(towers):
        checker.problems.append(f"towers {sorted(numbers['towers'])}, expected {sorted(towers)}")
    for tower, entry in numbers["towers"].items():
        cfg = config[f"{tower}_config"]
        blocks = cfg["num_hidden_layers"]  # upcycle-clip makes every block MoE by default
        experts = cfg["num_local_experts"]
        checker.array(f"{tower}.expert_shares", entry["expert_shares"], [blocks, experts], sums_to_one=True)
        if "class_expert_shares" in entry:
            shape = [blocks, len(entry["class_names"]), experts]
            checker.array(f"{tower}.class_expert_shares", entry["class_expert_shares"], shape, sums_to_one=True)


def check_we_moe(numbers: dict, config: dict, checker: Checker, case: str):
    blocks, vectors, tasks = len(numbers["blocks"]), len(numbers["task_vectors"]), len(numbers["data_tasks"])
    vision = config.get("vision_config", config)
    if blocks != vision["num_hidden_layers"]:
        checker.problems.append(f"{blocks} WEMoE blocks, expected {vision['num_hidden_layers']}")
    if vectors != conversion.NUM_TASKS:
        checker.problems.append(f"{vectors} task vectors, expected {conversion.NUM_TASKS}")
    # WEMoE's weights are not softmaxed: shapes and finiteness only
    checker.array("mean_weights", numbers["mean_weights"], [blocks, tasks, vectors])
    checker.array("mean_weights_all_blocks", numbers["mean_weights_all_blocks"], [tasks, vectors])
    for name, per_sample in numbers["per_sample_weights"].items():
        checker.array(f"per_sample_weights.{name}", per_sample, [len(per_sample), blocks, vectors])


def check_moiie(numbers: dict, config: dict, checker: Checker, case: str):
    layers = numbers["layers"]
    if [entry["layer"] for entry in layers] != config["moe_layers"]:
        checker.problems.append(f"MoE layers {[entry['layer'] for entry in layers]}, expected {config['moe_layers']}")
    experts = sum(config[key] for key in ("num_vision_experts", "num_shared_experts", "num_language_experts"))
    for entry in layers:
        for modality in ("vision", "language"):
            if entry[f"{modality}_tokens"] == 0:
                checker.problems.append(f"layer {entry['layer']}: no {modality} tokens routed")
            checker.array(f"layer{entry['layer']}.{modality}_share", entry[f"{modality}_share"], [experts], True)


def check_mode(numbers: dict, config: dict, checker: Checker, case: str):
    experts = config["num_experts"]
    for task, entry in numbers["tasks"].items():
        checker.array(f"{task}.task_weights", entry["task_weights"], [experts], sums_to_one=True)
    for key, total in (("fine_clusters_per_expert", config["num_fine_clusters"]), ("pairs_per_expert", MODE_PAIRS)):
        counts = numbers[key]
        if not isinstance(counts, list) or len(counts) != experts or sum(counts) != total:
            checker.problems.append(f"{key} {counts}: expected {experts} counts summing to {total}")


CHECKS = {"clip_moe": check_clip_moe, "we_moe": check_we_moe, "moiie": check_moiie, "mode": check_mode}


def check_report(case_name: str, output_dir: Path, model_dir: Path) -> tuple[dict, Checker]:
    from PIL import Image

    report = json.loads((output_dir / "routing.json").read_text())
    checker = Checker()
    CHECKS[CASES[case_name].family](report["numbers"], model_config(model_dir), checker, case_name)
    figures = {}
    for entry in report["figures"].values():
        path = output_dir / entry["file"]
        try:
            with Image.open(path) as image:
                image.load()
                figures[entry["file"]] = {"pixels": list(image.size), "title": entry["title"]}
                if image.text.get("Title") != entry["title"]:
                    checker.problems.append(f"{entry['file']}: PNG title {image.text.get('Title')!r}")
        except OSError as err:
            checker.problems.append(f"{entry['file']}: {err}")
    markdown = (output_dir / "routing.md").read_text()
    missing = [f for f in figures if f"({f})" not in markdown]
    if missing:
        checker.problems.append(f"routing.md does not embed {missing}")
    summary = {
        "num_samples": report["num_samples"],
        "figures": figures,
        "arrays_checked": {name: _shape(value) for name, value in checker.checked.items()},
        "ok": not checker.problems,
        "problems": checker.problems,
    }
    return summary, checker


def max_difference(a: dict, b: dict) -> float | None:
    diffs = []
    for name in a.keys() & b.keys():
        x, y = _flat(a[name]), _flat(b[name])
        if len(x) == len(y):
            diffs += [abs(p - q) for p, q in zip(x, y)]
    return float(f"{max(diffs):.3g}") if diffs else None  # significant digits: MoDE's differ by 1e-7


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------


def run_analysis(name: str, dtype: str, model_dir: Path, data: Path, extra: list[str], root: Path, args):
    output_dir = root / "outputs" / f"{name}-{dtype}"
    if output_dir.exists():
        shutil.rmtree(output_dir)
    argv = ["analyze-routing", "--model", str(model_dir), "--data", str(data), "--output_dir", str(output_dir),
            "--device", "cpu", "--dtype", dtype, "--batch_size", str(args.batch_size), *extra]  # fmt: skip
    log(f"[{name} {dtype}] hf-moe analyze-routing ...")
    result = conversion.run_measured([*conversion.hf_moe_command(), *argv], root / "outputs" / f"{name}-{dtype}.log")
    result["command"] = conversion.short_command(argv)
    checker = None
    if "error" not in result:
        summary, checker = check_report(name, output_dir, model_dir)
        result.update(summary)
        result["samples_per_s"] = round(result["num_samples"] / result["wall_s"], 2)
        log(
            f"[{name} {dtype}] {result['wall_s']:.1f} s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, "
            f"{result['num_samples']} samples, {len(result['figures'])} figures, check "
            f"{'ok' if result['ok'] else result['problems']}"
        )
    else:
        log(f"[{name} {dtype}] failed: {result['error']}")
    if not args.keep_outputs and output_dir.exists():
        shutil.rmtree(output_dir)
    return result, checker


def conversion_root(args) -> Path:
    namespace = argparse.Namespace(shape=args.shape, layers=args.layers, dtype="auto")
    return conversion.setting_dir(Path(args.conversion_work_dir).expanduser(), namespace)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"Cases to run (default all): {', '.join(CASES)}.")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32", "float16"],
                        default=["bfloat16", "float32"], help="analyze-routing --dtype, one run each.")  # fmt: skip
    parser.add_argument("--layers", type=int, default=2, help="Blocks per tower / decoder (default 2).")
    parser.add_argument("--shape", choices=sorted(conversion.SHAPES), default="real",
                        help="real: the released widths; tiny: a stand-in for a smoke test.")  # fmt: skip
    parser.add_argument("--samples", type=int, default=32, help="Samples per case (default 32).")
    parser.add_argument("--batch_size", type=int, default=16, help="analyze-routing --batch_size.")
    parser.add_argument("--work_dir", default=str(Path.home() / ".cache" / "hf-moe-benchmarks" / "routing_analysis"),
                        help="Where the converted models, the data and the reports go.")  # fmt: skip
    parser.add_argument("--conversion_work_dir",
                        default=str(Path.home() / ".cache" / "hf-moe-benchmarks" / "conversion"),
                        help="benchmarks/conversion.py's --work_dir: the converters' generated inputs.")  # fmt: skip
    parser.add_argument("--output", help="Also write the JSON report to this file.")
    parser.add_argument("--keep_outputs", action="store_true", help="Keep the analyze-routing output folders.")
    parser.add_argument("--skip_baseline", action="store_true", help="Do not measure the bare interpreter.")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setting = conversion.Setting(conversion.SHAPES[args.shape], args.layers, "auto")
    root = Path(args.work_dir).expanduser() / f"{args.shape}-L{args.layers}"
    (root / "outputs").mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python benchmarks/routing_analysis.py " + " ".join(argv),
        "machine": conversion.machine(),
        "hf_moe": conversion.git_state(),
        "device": device_name(torch.device("cpu")),
        "shape": {"name": args.shape, "layers": args.layers, "samples": args.samples},
        "work_dir": str(root),
        "method": (
            "hf-moe analyze-routing as its console command in a fresh process, offline, --device cpu; wall_s "
            "includes the interpreter start and the model load; peak_rss_bytes: /usr/bin/time -v 'Maximum resident "
            "set size' of that process; samples_per_s: routing.json's num_samples / wall_s; check: routing.json's "
            "arrays have the model's shapes, shares sum to 1 per row, all finite, every figure decodes with its "
            "title and routing.md embeds it; bf16_vs_fp32: the largest absolute difference of the checked numbers"
        ),
    }
    from datetime import datetime, timezone

    report["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not args.skip_baseline:
        baseline = [sys.executable, "-c", "import torch, transformers, hf_moe.cli"]
        report["interpreter_baseline"] = conversion.run_measured(baseline, root / "outputs" / "baseline.log")
    report["models"], report["cases"] = {}, {}
    for name in dict.fromkeys(args.cases):
        case = CASES[name]
        entry = {"description": case.description}
        try:
            model_dir, info = ensure_model(case.conversion_case, conversion_root(args), root / "models", setting)
            report["models"][case.conversion_case] = info
            clusters = conversion_root(args) / "inputs" / "mode_clusters"
            samples = min(args.samples, case.max_samples or args.samples)
            data, extra = ensure_data(case, root / "data", samples, model_dir, clusters)
        except Exception as err:  # a model or data set that cannot be made: reported, the other cases still run
            log(f"[{name}] failed before analyze-routing ran: {err!r}")
            report["cases"][name] = {**entry, "error": repr(err)}
            continue
        checkers = {}
        for dtype in args.dtypes:
            entry[dtype], checkers[dtype] = run_analysis(name, dtype, model_dir, data, extra, root, args)
        if checkers.get("bfloat16") and checkers.get("float32"):
            entry["bf16_vs_fp32_max_abs_diff"] = max_difference(
                checkers["bfloat16"].checked, checkers["float32"].checked
            )
        report["cases"][name] = entry
    report["all_ok"] = all(
        run.get("ok", False) for entry in report["cases"].values() for dtype, run in entry.items()
        if dtype in args.dtypes
    ) and all("error" not in entry for entry in report["cases"].values())  # fmt: skip
    write_report(report, args.output)


if __name__ == "__main__":
    main()

"""Peak resident memory of `hf-moe merge`, `merge-wemoe` and `mode build` against the size of the folder they write,
each measured in a fresh process (random CLIP weights at a chosen width; the figures of the README come from it):

    python tests/streamed_memory.py setup DIR [--hidden 768 --layers 4 --tasks 8 --dtype float32]
    python tests/streamed_memory.py measure DIR CONVERTER   # merge-ties | merge-average | wemoe | wemoe-pruned | mode

`measure` prints one JSON line: the peak RSS above the process's baseline (after imports and a tiny warm-up
conversion, with the high-water mark reset through /proc/self/clear_refs), the absolute peak, the folder size and
their ratios.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


def rss_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def setup(root: Path, hidden: int, layers: int, tasks: int, experts: int, dtype: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    from hf_moe.toy import save_toy_clip

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            image_size=224,
            patch_size=32,
        ),
        text_config=dict(
            hidden_size=hidden * 2 // 3,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 96),
            vocab_size=4096,
        ),
        projection_dim=hidden * 2 // 3,
    )
    torch_dtype = getattr(torch, dtype)
    # The processor files of a tiny CLIP (the processor does not depend on the widths).
    tiny = save_toy_clip(root / "tiny", seed=0)
    processor_files = [p for p in tiny.iterdir() if p.suffix == ".json" and p.name != "config.json"]

    def save(model, folder):
        model.to(torch_dtype).save_pretrained(folder)
        for path in processor_files:
            (folder / path.name).write_bytes(path.read_bytes())

    clip = CLIPModel(config).eval()
    save(clip, root / "pretrained")
    state = clip.vision_model.state_dict()
    for i in range(tasks):
        generator = torch.Generator().manual_seed(100 + i)
        vision = CLIPVisionModel(config.vision_config)
        vision.load_state_dict({k: t + 0.01 * torch.randn(t.shape, generator=generator) for k, t in state.items()})
        save(vision, root / f"task{i}")
        del vision
    for k in range(experts):
        torch.manual_seed(200 + k)
        save(CLIPModel(config).eval(), root / f"expert{k}")
    from safetensors.torch import save_file

    clusters = root / "clusters"
    clusters.mkdir(exist_ok=True)
    dim = config.projection_dim
    fine = torch.nn.functional.normalize(torch.randn(64, dim), dim=1)
    save_file({"fine_centers": fine, "fine_to_coarse": torch.arange(64) % experts}, clusters / "centers.safetensors")
    info = {"num_fine_clusters": 64, "num_experts": experts, "seed": 0}
    info["encoder"] = {"name_or_path": str(root / "expert0"), "pooling": "clip", "max_length": 77}
    (clusters / "clusters.json").write_text(json.dumps(info))


def run(converter: str, root: Path, output: Path, tiny: bool) -> None:
    from hf_moe.conversion import build_mode, merge_wemoe
    from hf_moe.merging import merge_clip_vision

    tasks = sorted(root.glob("task*"), key=lambda p: int(p.name[4:]))
    experts = sorted(root.glob("expert*"), key=lambda p: int(p.name[6:]))
    pretrained = root / "pretrained"
    if tiny:  # the warm-up: the same code paths at the toy width (imports, lazy modules, tokenizer loading)
        tasks, experts, pretrained = tasks[:2], experts[:2], root / "tiny"
        tasks = [pretrained, pretrained]
    common = dict(return_model=False, overwrite=True)
    if converter.startswith("merge-"):
        merge_clip_vision(converter[len("merge-") :], pretrained, tasks, output, **common)
    elif converter == "wemoe":
        merge_wemoe(pretrained, tasks, output, **common)
    elif converter == "wemoe-pruned":
        merge_wemoe(pretrained, tasks, output, shared_router=True, prune_ratio=0.9, **common)
    elif converter == "mode":
        if tiny:
            return
        build_mode(experts, root / "clusters", output, **common)
    else:
        raise SystemExit(f"unknown converter {converter}")


def measure(root: Path, converter: str) -> dict:
    import torch  # noqa: F401

    from hf_moe.checkpoint_io import folder_size

    warm = root / f"warm-{converter}"
    run(converter, root, warm, tiny=True)
    baseline = rss_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    output = root / f"out-{converter}"
    start = time.perf_counter()
    run(converter, root, output, tiny=False)
    seconds = time.perf_counter() - start
    peak = rss_status("VmHWM")
    size = folder_size(output)
    return {
        "converter": converter,
        "seconds": round(seconds, 1),
        "output_bytes": size,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "ratio_above_baseline": round((peak - baseline) / size, 3),
        "ratio_absolute": round(peak / size, 3),
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup")
    s.add_argument("root", type=Path)
    s.add_argument("--hidden", type=int, default=768)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--tasks", type=int, default=8)
    s.add_argument("--experts", type=int, default=4)
    s.add_argument("--dtype", default="float32")
    m = sub.add_parser("measure")
    m.add_argument("root", type=Path)
    m.add_argument("converter")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.command == "setup":
        setup(args.root, args.hidden, args.layers, args.tasks, args.experts, args.dtype)
    else:
        print(json.dumps(measure(args.root, args.converter)))


if __name__ == "__main__":
    sys.exit(main())

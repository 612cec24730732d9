"""`hf-moe analyze-routing` for CLIP-MoE: which experts each tower's MoE blocks use, overall and per class.

Every token of every MoE block picks its top-k experts (`MoETopKRouter`: top-k of the softmax of its router logits,
which `output_router_logits=True` returns per block as a `(batch * sequence, num_experts)` tensor). An expert's
share in a block is the fraction of those (token, choice) selections that went to it: a balanced block gives every
expert 1 / num_experts; the max/min balance ratio of a block is its largest share over its smallest (1: balanced,
inf: an expert never chosen). Vision tokens are all of an image's tokens (patches and class token); text tokens are
a caption's non-padding tokens (its `attention_mask`), as the balance loss counts them.

    hf-moe analyze-routing --model CLIP_MOE_DIR --data CLASS_FOLDERS_OR_CAPTIONED_FOLDER --output_dir DIR

With class labels (class folders, or a `label` column), the same shares per class (classes x experts heatmaps for the
`--blocks` chosen, by default each tower's first and last MoE block; routing.json holds every block). With captions
(a captioned image folder's `text`), the captions go through the text tower, each attributed to its image's class.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from ..evaluation import load_image_dataset, to_rgb_image
from ..loading import device_option, dtype_option
from ..routing_report import (
    Heatmap,
    RoutingArguments,
    RoutingReport,
    balance_ratio,
    batch_ranges,
    first_per_group,
    format_ratio,
)


logger = logging.get_logger(__name__)

TOWERS = ("vision", "text")
# model_type -> the towers its model has (a joint CLIP-MoE, or one tower saved alone).
MODEL_TOWERS = {"clip_moe": TOWERS, "clip_moe_vision_model": ("vision",), "clip_moe_text_model": ("text",)}


# ----------------------------------------------------------------------------------------------------------------
# The numbers, from model outputs
# ----------------------------------------------------------------------------------------------------------------


def selection_counts(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    num_experts: int,
    batch_size: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(batch_size, num_blocks, num_experts)`: how many of each sample's tokens chose each expert (among their top-k)
    in each MoE block, from a tower's `router_logits` (one `(batch_size * sequence_length, num_experts)` tensor per
    MoE block). Tokens where `attention_mask` (`(batch_size, sequence_length)`) is 0, text padding, are not counted.
    The top-k is the router's: of the fp32 softmax of the logits."""
    counts = []
    for logits in router_logits:
        logits = logits.detach().float().reshape(batch_size, -1, num_experts)
        chosen = logits.softmax(dim=-1).topk(top_k, dim=-1).indices  # (batch, sequence, k)
        per_token = F.one_hot(chosen, num_experts).sum(dim=2)  # (batch, sequence, experts)
        if attention_mask is not None:
            per_token = per_token * attention_mask.to(per_token.device)[..., None].to(per_token.dtype)
        counts.append(per_token.sum(dim=1))
    return torch.stack(counts, dim=1).cpu().to(torch.float64)


def expert_shares(counts: torch.Tensor) -> torch.Tensor:
    """`(num_blocks, num_experts)`: each expert's share of a block's selections, from the `selection_counts` of all
    samples `(num_samples, num_blocks, num_experts)`; each row sums to 1 (a block with no tokens: 0)."""
    totals = counts.sum(dim=0)
    return totals / totals.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def class_shares(counts: torch.Tensor, labels: list[int], num_classes: int) -> torch.Tensor:
    """`(num_blocks, num_classes, num_experts)`: per block, each class's expert shares (its samples' selections
    only); a class without samples gets a row of zeros."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    per_class = torch.zeros(num_classes, *counts.shape[1:], dtype=counts.dtype)
    per_class.index_add_(0, labels, counts)  # (classes, blocks, experts)
    shares = per_class / per_class.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return shares.transpose(0, 1)


def balance_ratios(shares: torch.Tensor) -> list[float]:
    """The max/min balance ratio of each block (row) of `expert_shares`."""
    return [balance_ratio(row) for row in shares.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def data_labels(dataset) -> tuple[list[int] | None, list[str] | None]:
    """Each row's class id and the class names (a ClassLabel's names, else the distinct values as text), or
    (None, None) for data without a `label` column."""
    import datasets

    if "label" not in dataset.column_names:
        return None, None
    values = dataset["label"]
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return [int(value) for value in values], list(feature.names)
    distinct = sorted(set(values), key=lambda value: (str(type(value)), value))
    index = {value: i for i, value in enumerate(distinct)}
    return [index[value] for value in values], [str(value) for value in distinct]


def row_captions(text) -> list[str]:
    """The non-empty captions of one `text` cell (a caption or a list of them)."""
    texts = [text] if text is None or isinstance(text, str) else list(text)
    return [caption for caption in texts if isinstance(caption, str) and caption.strip()]


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _tower_config(config, tower: str):
    return getattr(config, f"{tower}_config", None) or config


def _tower_module(model, model_type: str, tower: str):
    return model if model_type != "clip_moe" else getattr(model, f"{tower}_model")


def block_labels(config, tower: str) -> list[str]:
    return [f"block {index}" for index in _tower_config(config, tower).moe_layer_indices()]


def chosen_blocks(config, tower: str, blocks: list[int] | None) -> list[int]:
    """Positions (among the tower's MoE blocks) of the blocks whose classes x experts figure is drawn: `blocks`
    (encoder layer indices; those the tower has) or its first and last MoE block."""
    indices = _tower_config(config, tower).moe_layer_indices()
    if blocks is None:
        return sorted({0, len(indices) - 1}) if indices else []
    return [indices.index(block) for block in blocks if block in indices]


@torch.inference_mode()
def route(model, model_type: str, processor, dataset, towers, batch_size: int, device, progress: bool = True):
    """Run the data through each tower; returns {tower: counts `(num_samples, blocks, experts)`} and, for the text
    tower, the row of each caption."""
    config = model.config
    counts = {tower: [] for tower in towers}
    caption_rows: list[int] = []
    dtype = next(model.parameters()).dtype
    columns = [column for column in ("image", "text") if column in dataset.column_names]
    if "text" in towers:
        from ..evaluation import text_max_length

        max_length = text_max_length(model, processor.tokenizer)
    for rows in tqdm(batch_ranges(len(dataset), batch_size), desc="Routing", unit="batch", disable=not progress):
        batch = dataset.select_columns(columns)[rows.start : rows.stop]
        if "vision" in towers:
            cfg = _tower_config(config, "vision")
            image_processor = getattr(processor, "image_processor", processor)  # a vision tower's folder: no tokenizer
            images = [to_rgb_image(image) for image in batch["image"]]
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
            output = _tower_module(model, model_type, "vision")(pixel_values=pixels, output_router_logits=True)
            counts["vision"].append(
                selection_counts(output.router_logits, cfg.num_experts_per_tok, cfg.num_local_experts, len(rows))
            )
        if "text" in towers:
            cfg = _tower_config(config, "text")
            captions, owners = [], []
            for row, text in zip(rows, batch["text"]):
                kept = row_captions(text)
                captions += kept
                owners += [row] * len(kept)
            if not captions:
                continue
            tokens = processor.tokenizer(
                captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            output = _tower_module(model, model_type, "text")(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], output_router_logits=True
            )
            counts["text"].append(
                selection_counts(
                    output.router_logits,
                    cfg.num_experts_per_tok,
                    cfg.num_local_experts,
                    len(captions),
                    tokens["attention_mask"],
                )
            )
            caption_rows += owners
    return {tower: torch.cat(parts) if parts else None for tower, parts in counts.items()}, caption_rows


def routing_numbers(config, counts: dict, labels, class_names, caption_rows) -> dict:
    """routing.json's `numbers` from the towers' selection counts: per tower, block labels, expert shares, balance
    ratios, token selections; with labels, per class and block the classes x experts shares."""
    numbers = {"towers": {}}
    for tower, tower_counts in counts.items():
        if tower_counts is None:
            continue
        cfg = _tower_config(config, tower)
        shares = expert_shares(tower_counts)
        entry = {
            "blocks": cfg.moe_layer_indices(),
            "num_experts": cfg.num_local_experts,
            "top_k": cfg.num_experts_per_tok,
            "num_samples": tower_counts.shape[0],
            "selections_per_block": tower_counts.sum(dim=(0, 2)).tolist(),
            "expert_shares": shares.tolist(),
            "balance_ratio": balance_ratios(shares),
        }
        if labels is not None:
            sample_labels = labels if tower == "vision" else [labels[row] for row in caption_rows]
            per_class = class_shares(tower_counts, sample_labels, len(class_names))
            entry["class_names"] = list(class_names)
            entry["class_expert_shares"] = per_class.tolist()  # [block][class][expert]
        numbers["towers"][tower] = entry
    return numbers


def routing_figures(numbers: dict, model_name: str, blocks: list[int] | None, config) -> list[Heatmap]:
    figures = []
    for tower, entry in numbers["towers"].items():
        experts = [f"expert {e}" for e in range(entry["num_experts"])]
        unit = "images" if tower == "vision" else "captions"
        ratios = entry["balance_ratio"]
        rows = [f"block {b} (max/min {format_ratio(r)})" for b, r in zip(entry["blocks"], ratios)]
        low, high = format_ratio(min(ratios)), format_ratio(max(ratios))
        figures.append(
            Heatmap(
                name=f"clip_moe_{tower}_expert_share",
                title=f"CLIP-MoE {tower} tower: each expert's share of routed tokens per MoE block "
                f"(top-{entry['top_k']}; max/min balance ratio {low} to {high})",
                matrix=entry["expert_shares"],
                row_labels=rows,
                column_labels=experts,
                xlabel="expert",
                ylabel="MoE block",
                caption=f"Share of the {tower} tokens' top-{entry['top_k']} selections that each expert receives "
                f"in each MoE block of {model_name} ({entry['num_samples']} {unit}; balanced: "
                f"{1 / entry['num_experts']:.2f} each). The row label gives the block's max/min share ratio.",
            )
        )
        if "class_expert_shares" in entry:
            for position in chosen_blocks(config, tower, blocks):
                block = entry["blocks"][position]
                figures.append(
                    Heatmap(
                        name=f"clip_moe_{tower}_block{block}_class_expert_share",
                        title=f"CLIP-MoE {tower} tower, block {block}: expert shares per class",
                        matrix=entry["class_expert_shares"][position],
                        row_labels=list(entry["class_names"]),
                        column_labels=experts,
                        xlabel="expert",
                        ylabel="class",
                        caption=f"Per class, the share of its {unit}' "
                        f"{tower} tokens' selections that each expert receives in block {block}: rows that differ "
                        "mean the router sends the classes to different experts.",
                    )
                )
    return figures


def analyze_routing(args: RoutingArguments, progress: bool = True) -> RoutingReport:
    """Route `args.data` through the CLIP-MoE `args.model` and return the report (see the module docstring)."""
    from ..loading import check_model_type, load_config, load_pretrained, load_processor

    # What `hf-moe eval` reads (image / class folders, Hub ids, save_to_disk, parquet), before the model loads.
    dataset = load_image_dataset(args.data, args.split)
    labels, class_names = data_labels(dataset)
    keep = first_per_group(labels if labels is not None else [0] * len(dataset), args.max_samples)
    if len(keep) != len(dataset):
        dataset = dataset.select(keep)
        labels = [labels[i] for i in keep] if labels is not None else None
    if len(dataset) == 0:
        raise ValueError(f"The data '{args.data}' holds no images to route.")
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    check_model_type(config, args.model, tuple(MODEL_TOWERS), "CLIP-MoE's routing analysis")
    model_type = config.model_type
    if args.blocks is not None:
        available = sorted({b for t in MODEL_TOWERS[model_type] for b in _tower_config(config, t).moe_layer_indices()})
        missing = [block for block in args.blocks if block not in available]
        if missing:
            raise ValueError(
                f"--blocks {missing}: '{args.model}' has no such MoE block; its MoE blocks are {available}."
            )
    has_text = "text" in dataset.column_names
    towers = [tower for tower in MODEL_TOWERS[model_type] if tower == "vision" or has_text]
    if not towers:
        raise ValueError(
            f"'{args.model}' is a CLIP-MoE text tower alone; its routing needs captions, and '{args.data}' has no "
            f"'text' column (columns: {dataset.column_names})."
        )
    device = device_option(args.device)
    model = load_pretrained(
        args.model, config=config, dtype=dtype_option(args.dtype), trust_remote_code=args.trust_remote_code
    )
    model = model.to(device).eval()
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except Exception:
        processor = load_processor(args.model)  # a vision tower saved with its image processor only
    if processor is None:
        raise OSError(f"'{args.model}' has no processor (image processor / tokenizer) to prepare the data.")
    counts, caption_rows = route(model, model_type, processor, dataset, towers, args.batch_size, device, progress)
    numbers = routing_numbers(config, counts, labels, class_names, caption_rows)
    name = Path(args.model).name or args.model
    parts = [f"{len(dataset)} images"]
    if class_names is not None:
        parts.append(f"{len(class_names)} classes")
    if "text" in counts and counts["text"] is not None:
        parts.append(f"{len(caption_rows)} captions")
    notes = []
    if not has_text and "text" in MODEL_TOWERS[model_type]:
        notes.append("The data has no captions (`text`), so only the vision tower was routed.")
    if labels is None:
        notes.append("The data has no class labels, so there are no per-class figures.")
    if args.max_samples is not None:
        notes.append(f"At most {args.max_samples} images per {'class' if labels is not None else 'data set'}.")
    return RoutingReport(
        model=args.model,
        model_type=model_type,
        data=args.data,
        data_description=", ".join(parts),
        num_samples=len(dataset),
        numbers=numbers,
        figures=routing_figures(numbers, name, args.blocks, config),
        notes=notes,
    )

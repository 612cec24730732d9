"""`hf-moe analyze-routing` for MoIIE: on a conversation JSON (the LLaVA format `hf-moe train-moiie` reads), per MoE
layer, the share of the vision tokens' and of the language tokens' expert choices that each expert receives.

A MoIIE MoE layer packs its experts `[vision..., shared..., language...]`. Under `variant="moiie"` a vision token is
routed (top-k) by the vision router over the vision + shared experts and a language token by the language router over
the shared + language experts; both routers score every token, and the model returns their logits per layer
(`vision_router_logits` / `language_router_logits`, all tokens of the batch, padding included). The top-k choice of
each non-padding token is taken from the logits of its own modality's router as the model routes it
(`MoETopKRouter`: fp32 softmax, top-k); `"vanilla"`: one router over all experts for both modalities; `"modality"`:
no router, vision tokens go to the first vision expert and language tokens to the first language expert.

Numbers per layer (`routing.json["numbers"]["layers"]`): the non-padding vision / language token counts, each
expert's count of top-k choices per modality and the shares (count / all choices of that modality's tokens in the
layer; each modality's shares sum to 1). Figures: per MoE layer, stacked bars of the two shares per expert with the
vision-only / shared / language-only experts marked, and one heatmap of every layer's shares.
"""

import torch

from ..loading import device_option, dtype_option
from ..routing_report import Heatmap, RoutingArguments, RoutingReport, StackedBars


MODALITIES = ("vision", "language")
EXPERT_GROUPS = ("vision-only", "shared", "language-only")
ROUTED_VARIANTS = ("moiie", "vanilla", "modality")


def expert_groups(config) -> list[str]:
    """The group of each expert of a MoE layer, in packing order: vision-only, shared, language-only."""
    counts = (config.num_vision_experts, config.num_shared_experts, config.num_language_experts)
    return [group for group, count in zip(EXPERT_GROUPS, counts) for _ in range(count)]


def expert_labels(config) -> list[str]:
    """`"E0\nvision-only"`, ...: each expert of a MoE layer over its group (two lines, so that the labels of a few
    experts fit side by side)."""
    return [f"E{index}\n{group}" for index, group in enumerate(expert_groups(config))]


def token_masks(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Flat `(batch * seq,)` bool masks of the non-padding vision (token type 1) and language tokens."""
    types = token_type_ids.reshape(-1)
    valid = torch.ones_like(types, dtype=torch.bool) if attention_mask is None else attention_mask.reshape(-1).bool()
    return {"vision": valid & (types == 1), "language": valid & (types != 1)}


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    # As MoETopKRouter chooses: fp32 softmax, then top-k (the renormalisation after it changes no choice).
    return torch.topk(logits.float().softmax(dim=-1), top_k, dim=-1).indices


def layer_expert_counts(
    config,
    vision_logits: torch.Tensor | None,
    language_logits: torch.Tensor | None,
    token_type_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One MoE layer of one batch: `{"vision": counts, "language": counts}`, each `(num_local_experts,)` int64, how
    many top-k choices of the non-padding tokens of that modality went to each expert, from the layer's router logits
    (`(batch * seq, router_experts)`, as the model returns them) as the model routes them (see the module docstring).
    `"modality"` needs no logits."""
    num_experts, top_k = config.num_local_experts, config.num_experts_per_tok
    masks = token_masks(token_type_ids, attention_mask)
    counts = {}
    for modality in MODALITIES:
        mask = masks[modality].to("cpu")
        if config.variant == "modality":
            expert = 0 if modality == "vision" else config.num_vision_experts + config.num_shared_experts
            chosen = torch.full((int(mask.sum()), 1), expert, dtype=torch.long)
        else:
            logits = (vision_logits if modality == "vision" else language_logits).detach().to("cpu")
            chosen = _top_k(logits[mask], top_k)
            if config.variant == "moiie" and modality == "language":
                chosen = chosen + config.num_vision_experts  # the language router's experts start at the shared ones
        counts[modality] = torch.bincount(chosen.reshape(-1), minlength=num_experts)
    return counts


def batch_expert_counts(config, outputs, token_type_ids, attention_mask=None) -> list[dict[str, torch.Tensor]]:
    """`layer_expert_counts` for every MoE layer (in layer order) of one forward's `outputs`
    (`MoIIECausalLMOutputWithPast` with router logits)."""
    layers = config.moe_layer_indices()
    if config.variant == "modality":
        return [layer_expert_counts(config, None, None, token_type_ids, attention_mask) for _ in layers]
    vision, language = outputs.vision_router_logits, outputs.language_router_logits
    if vision is None or language is None or len(vision) != len(layers):
        raise RuntimeError(
            f"The model returned no router logits for its {len(layers)} MoE layers (output_router_logits=True)."
        )
    return [
        layer_expert_counts(config, vision_logits, language_logits, token_type_ids, attention_mask)
        for vision_logits, language_logits in zip(vision, language)
    ]


def modality_shares(counts: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per modality, each expert's share of that modality's top-k choices (counts / their sum; zeros when the
    modality has no token)."""
    shares = {}
    for modality, values in counts.items():
        total = int(values.sum())
        shares[modality] = [int(value) / total if total else 0.0 for value in values]
    return shares


def layer_numbers(config, counts_per_layer: list[dict[str, torch.Tensor]]) -> list[dict]:
    """routing.json's per-layer numbers from the summed counts of every MoE layer."""
    top_k = 1 if config.variant == "modality" else config.num_experts_per_tok
    numbers = []
    for layer, counts in zip(config.moe_layer_indices(), counts_per_layer):
        shares = modality_shares(counts)
        numbers.append(
            {
                "layer": layer,
                "vision_tokens": int(counts["vision"].sum()) // top_k,
                "language_tokens": int(counts["language"].sum()) // top_k,
                "vision_choices": counts["vision"].tolist(),
                "language_choices": counts["language"].tolist(),
                "vision_share": shares["vision"],
                "language_share": shares["language"],
            }
        )
    return numbers


def routing_figures(config, layers: list[dict]) -> list:
    """Per MoE layer a `StackedBars` of the vision and language shares per expert (groups marked), and one `Heatmap`
    of every layer's shares (rows: layer x modality, columns: experts)."""
    labels, groups = expert_labels(config), expert_groups(config)
    figures = []
    for numbers in layers:
        layer = numbers["layer"]
        figures.append(
            StackedBars(
                name=f"moiie_layer_{layer}_modality_share",
                title=f"MoIIE decoder layer {layer}: share of the vision and language tokens' expert choices",
                categories=labels,
                series={"vision tokens": numbers["vision_share"], "language tokens": numbers["language_share"]},
                xlabel="expert (vision-only / shared / language-only)",
                ylabel="share of the modality's top-k choices",
                caption=(
                    f"Each colour sums to 1 over the experts: the share of the {numbers['vision_tokens']} vision and "
                    f"{numbers['language_tokens']} language tokens' top-{config.num_experts_per_tok} choices that "
                    "each expert receives (padding excluded)."
                ),
                category_groups=groups,
            )
        )
    rows, matrix = [], []
    for numbers in layers:
        for modality in MODALITIES:
            rows.append(f"layer {numbers['layer']} {modality}")
            matrix.append(numbers[f"{modality}_share"])
    figures.append(
        Heatmap(
            name="moiie_modality_share_heatmap",
            title="MoIIE: share of each modality's expert choices per MoE layer",
            matrix=matrix,
            row_labels=rows,
            column_labels=labels,
            xlabel="expert",
            ylabel="MoE layer and token modality",
            caption="Each row sums to 1: each expert's share of that layer's vision or language tokens' top-k choices.",
        )
    )
    return figures


def check_routed(config, model: str) -> None:
    if config.variant not in ROUTED_VARIANTS:
        raise ValueError(
            f"'{model}' is a '{config.variant}' MoIIE: it has no MoE layers, so there is no routing to analyse "
            f"(variants with experts: {', '.join(ROUTED_VARIANTS)})."
        )


def load_routing_data(args: RoutingArguments, processor):
    """The conversation samples of `args.data` (the first `args.max_samples`), checked as `hf-moe train-moiie` checks
    them (turns, images, placeholders) except that samples without an answer are fine: every error a one-line
    `ValueError` / `OSError` naming the file, sample and field."""
    from .data import MoIIECollator, _where, check_image, load_conversations, turn_problem

    dataset = load_conversations(args.data, args.image_folder)
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise ValueError(f"--max_samples must be positive, got {args.max_samples}.")
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"'{args.data}' holds no samples.")
    collator = MoIIECollator(processor)
    sizes: dict[str, tuple[int, int]] = {}
    for row in dataset:
        problem = turn_problem(row["conversations"])
        if problem is not None:
            raise ValueError(f"{_where(args.data, row['id'], problem[0])}: {problem[1]}.")
        for path in row["images"]:
            if path not in sizes:  # an image shared by several samples is checked once
                sizes[path] = check_image(path, _where(args.data, row["id"], "image"))
        tokens = [collator.tokens_for_size(*sizes[path]) for path in row["images"]]
        try:
            collator.check(row, tokens)
        except ValueError as err:
            raise ValueError(f"{_where(args.data, row['id'], 'conversations')}: {err}") from err
    return dataset, collator


@torch.no_grad()
def route_conversations(model, collator, dataset, batch_size: int, device, progress: bool = True):
    """The summed `batch_expert_counts` of every MoE layer over `dataset`, and the number of samples."""
    from tqdm.auto import tqdm

    config = model.config
    totals = None
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="Routing conversations", unit="batch", disable=not progress):
        rows = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        batch.pop("labels")
        batch = {key: value.to(device) for key, value in batch.items()}
        outputs = model(**batch, output_router_logits=True, use_cache=False, logits_to_keep=1)
        counts = batch_expert_counts(config, outputs, batch["token_type_ids"], batch["attention_mask"])
        if totals is None:
            totals = counts
        else:
            totals = [{m: total[m] + layer[m] for m in MODALITIES} for total, layer in zip(totals, counts)]
    return totals


def analyze_routing(args: RoutingArguments, progress: bool = True) -> RoutingReport:
    """`hf-moe analyze-routing` on a MoIIE model (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from ..loading import load_config, load_pretrained

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}.")
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    check_routed(config, args.model)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    # The data is checked before the (possibly large) model is loaded.
    dataset, collator = load_routing_data(args, processor)
    device = device_option(args.device)
    model = load_pretrained(
        args.model,
        AutoModelForCausalLM,
        config=config,
        trust_remote_code=args.trust_remote_code,
        dtype=dtype_option(args.dtype),
    )
    model.to(device).eval()
    totals = route_conversations(model, collator, dataset, args.batch_size, device, progress)
    layers = layer_numbers(config, totals)
    images = sum(len(images) for images in dataset["images"])
    vision_tokens = layers[0]["vision_tokens"] if layers else 0
    language_tokens = layers[0]["language_tokens"] if layers else 0
    return RoutingReport(
        model=args.model,
        model_type=config.model_type,
        data=args.data,
        data_description=(
            f"LLaVA-format conversations with {images} images: {vision_tokens} vision and {language_tokens} "
            "language tokens (padding excluded)"
        ),
        num_samples=len(dataset),
        numbers={
            "variant": config.variant,
            "top_k": config.num_experts_per_tok,
            "experts": [f"E{index}" for index in range(config.num_local_experts)],
            "expert_groups": expert_groups(config),
            "layers": layers,
        },
        figures=routing_figures(config, layers),
        notes=[
            f"Variant `{config.variant}`: experts are packed vision-only, shared, language-only "
            f"({config.num_vision_experts} / {config.num_shared_experts} / {config.num_language_experts}); "
            + {
                "moiie": "vision tokens are routed by the vision router over the vision-only and shared experts, "
                "language tokens by the language router over the shared and language-only experts.",
                "vanilla": "one router routes every token over all experts.",
                "modality": "no router: vision tokens go to the first vision expert, language tokens to the first "
                "language expert.",
            }[config.variant]
        ],
    )


__all__ = [
    "EXPERT_GROUPS",
    "analyze_routing",
    "batch_expert_counts",
    "expert_groups",
    "expert_labels",
    "layer_expert_counts",
    "layer_numbers",
    "modality_shares",
    "routing_figures",
    "token_masks",
]

"""Convert the official CLIP-MoE release files into a CLIPMoEModel folder.

The official weights (`clip-moe-4-2-sharegpt4v.pt`, `clip-moe-4-2-recap-dc.pt`) are raw pickled fp32 state
dicts in OpenAI-CLIP naming: `visual.transformer.resblocks.{i}.experts.{e}.c_fc.weight`, `...gate.weight`,
fused `attn.in_proj_weight`, `(d, out)` projections, and Long-CLIP's split text positions
(`positional_embedding` for positions < 20, `positional_embedding_res` for the rest). A dense CLIP of the
same architecture (`--base`, e.g. openai/clip-vit-large-patch14) supplies the config and the processor.

    hf-moe convert-clip-moe-original clip-moe-4-2-sharegpt4v.pt \
        --base openai/clip-vit-large-patch14 --output_dir clip-moe-sharegpt4v
"""

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.utils import logging

from ..arguments import HubArguments
from ..cards import CardSpec, command_line
from ..checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    LazyCheckpoint,
    StreamedModel,
    checkpoint_dtype,
    planned_state_dict,
    resolve_dtype,
)
from ..loading import load_clip_processor
from ..modeling import CLIPMoEModel
from ..modeling.configuration_clip_moe import LONG_CLIP_KEPT_POSITIONS, LONG_CLIP_TEXT_LENGTH
from ..publish import check_destination, hub_keywords, write_model
from .upcycle_clip import clip_moe_config_from_dense, load_dense_clip_config


logger = logging.get_logger(__name__)

BLOCK_KEY = re.compile(r"^(?P<tower>visual\.transformer|transformer)\.resblocks\.(?P<layer>\d+)\.(?P<rest>.+)$")
EXPERT_KEY = re.compile(r"^experts\.(?P<expert>\d+)\.(?P<fc>c_fc|c_proj)\.(?P<kind>weight|bias)$")
HF_TOWER = {"visual.transformer": "vision_model", "transformer": "text_model"}
EXPERT_PARAM = {
    ("c_fc", "weight"): "up_proj",
    ("c_fc", "bias"): "up_proj_bias",
    ("c_proj", "weight"): "down_proj",
    ("c_proj", "bias"): "down_proj_bias",
}
BLOCK_PARAMS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "gate.weight": "mlp.router.weight",
}
TOP_LEVEL = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Entries of OpenAI's JIT archives that are metadata, not weights.
IGNORED = {"input_resolution", "context_length", "vocab_size"}


def open_original_checkpoint(checkpoint: str | Path) -> LazyCheckpoint:
    """An official `.pt` state dict, read lazily (tensors only, no code executed; memory-mapped), unwrapping
    `state_dict` / `model` and `module.`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"CLIP-MoE checkpoint {checkpoint} does not exist.")
    try:
        return LazyCheckpoint(
            checkpoint,
            key_mapping=lambda key: None if key in IGNORED else key.removeprefix("module."),
            label=f"CLIP-MoE release '{checkpoint}'",  # its NaN / inf tensors are refused as they are read
        )
    except Exception as err:
        if isinstance(err, ValueError) and "does not hold a state dict of tensors" in str(err):
            raise
        raise ValueError(
            f"Could not read {checkpoint} as a PyTorch state dict (corrupt or not a checkpoint?): {err}"
        ) from err


def moe_layout(state_dict: dict[str, torch.Tensor]) -> tuple[int, list[int], list[int]]:
    """Number of experts and the MoE block indices of the vision and text towers, read off the keys."""
    experts, layers = set(), {"vision_model": set(), "text_model": set()}
    for key in state_dict:
        match = BLOCK_KEY.match(key)
        expert = EXPERT_KEY.match(match["rest"]) if match else None
        if expert:
            experts.add(int(expert["expert"]))
            layers[HF_TOWER[match["tower"]]].add(int(match["layer"]))
    if not experts:
        raise ValueError("The checkpoint has no `resblocks.*.experts.*` keys: it is not a CLIP-MoE checkpoint.")
    if experts != set(range(len(experts))):
        raise ValueError(f"Expert indices {sorted(experts)} are not contiguous from 0.")
    return len(experts), sorted(layers["vision_model"]), sorted(layers["text_model"])


# How one converted tensor is made: its shape, the original keys it is made from, and the function of those tensors.
Recipe = tuple[torch.Size, list[str], Callable[..., torch.Tensor]]


def _same(tensor):
    return tensor


def _transposed(tensor):
    return tensor.t().contiguous()


def _chunk(index):
    def part(tensor):
        return tensor.chunk(3, dim=0)[index].contiguous()

    return part


def _stack(*tensors):
    return torch.stack(tensors)


def conversion_recipes(original: LazyCheckpoint, num_experts: int) -> dict[str, Recipe]:
    """For each CLIPMoEModel tensor, how to make it from the OpenAI-naming checkpoint `original`: renamed, split
    (fused q/k/v), transposed (projections), stacked (experts) or merged (Long-CLIP positions). Only names and
    shapes are read, so every refusal comes before any tensor is."""
    shape = original.shape
    recipes, experts, unknown = {}, defaultdict(dict), []
    for key in original:
        match = BLOCK_KEY.match(key)
        rest = match["rest"] if match else None
        prefix = f"{HF_TOWER[match['tower']]}.encoder.layers.{match['layer']}" if match else None
        if key in TOP_LEVEL:
            recipes[TOP_LEVEL[key]] = (shape(key), [key], _same)
        elif key in TRANSPOSED:
            recipes[TRANSPOSED[key]] = (torch.Size(reversed(shape(key))), [key], _transposed)
        elif key in ("positional_embedding", "positional_embedding_res"):
            continue  # merged below
        elif rest in BLOCK_PARAMS:
            recipes[f"{prefix}.{BLOCK_PARAMS[rest]}"] = (shape(key), [key], _same)
        elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind, fused = rest.rsplit("_", 1)[-1], shape(key)
            for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
                part = torch.Size([fused[0] // 3, *fused[1:]])
                recipes[f"{prefix}.self_attn.{name}.{kind}"] = (part, [key], _chunk(index))
        elif rest and (expert := EXPERT_KEY.match(rest)):
            target = f"{prefix}.mlp.experts.{EXPERT_PARAM[expert['fc'], expert['kind']]}"
            experts[target][int(expert["expert"])] = key
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unrecognised keys in the checkpoint: {sorted(unknown)[:10]}")
    for target, per_expert in experts.items():
        if sorted(per_expert) != list(range(num_experts)):
            raise ValueError(f"{target}: experts {sorted(per_expert)} found, expected 0..{num_experts - 1}.")
        keys = [per_expert[e] for e in range(num_experts)]
        shapes = {shape(key) for key in keys}
        if len(shapes) != 1:
            raise ValueError(f"{target}: the experts' tensors have different shapes {sorted(map(tuple, shapes))}.")
        recipes[target] = (torch.Size([num_experts, *shapes.pop()]), keys, _stack)
    recipes["text_model.embeddings.position_embedding.weight"] = _text_positions_recipe(original, shape)
    return recipes


def _merge_positions(positions, residual=None):
    if residual is None:
        return positions
    return torch.cat([positions[:LONG_CLIP_KEPT_POSITIONS], residual[LONG_CLIP_KEPT_POSITIONS:]])


def _text_positions_recipe(original, shape) -> Recipe:
    """Long-CLIP adds a frozen copy (positions < 20) and a trained copy (the rest); we store the sum once."""
    if "positional_embedding" not in original:
        raise ValueError("The checkpoint has no `positional_embedding`.")
    positions = shape("positional_embedding")
    if "positional_embedding_res" not in original:
        return positions, ["positional_embedding"], _merge_positions
    residual = shape("positional_embedding_res")
    if residual != positions:
        raise ValueError(f"positional_embedding {tuple(positions)} vs positional_embedding_res {tuple(residual)}.")
    return positions, ["positional_embedding", "positional_embedding_res"], _merge_positions


@hub_keywords
def convert_clip_moe_original(
    checkpoint: str | Path,
    base: str | Path,
    output_dir: str | Path,
    top_k: int = 2,
    overwrite: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    return_model: bool = True,
    hub: HubArguments | None = None,
) -> CLIPMoEModel | None:
    """Convert an official CLIP-MoE `.pt` release into a CLIPMoEModel folder (safetensors + remote code + processor
    + model card). The release is memory-mapped and the output written tensor by tensor (`hf_moe.checkpoint_io`).

    `base` must be a dense CLIP (model_type 'clip'): an hf-moe folder (CLIP-MoE, WEMoE, MoIIE, MoDE) is refused,
    naming its family. NaN or inf in a tensor of the release is refused, naming it, with nothing written.

    Args:
        checkpoint: The official state dict file.
        base: The dense CLIP it was built from (Hub id or folder): architecture and processor.
        output_dir: Where to write (atomically); it may not hold `checkpoint` or `base`.
        top_k: Experts per token (the official release uses 2; the checkpoint does not record it).
        dtype: Dtype of the written weights: "auto" (the release's, float32 for the official files), "float32",
            "bfloat16" or "float16".
        max_shard_size: Larger outputs are written as shards of at most this size with an index.
        return_model: Load the written model and return it; False returns None (the command line's choice).
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's, default the base model's own where its card
            states one). Default: no push.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    resolve_dtype(dtype, torch.float32)  # an unknown name is refused before any work
    hub = check_destination(output_dir, overwrite, [checkpoint, base], hub)
    with open_original_checkpoint(checkpoint) as original:
        model, layout = build_converted(original, checkpoint, base, top_k, dtype, max_shard_size)
        config = model.config
        write_model(
            model,
            output_dir,
            card=converted_card(checkpoint, base, config, layout, dtype),
            processor=load_clip_processor(base, config.text_config.max_position_embeddings),
            hub=hub,
            overwrite=overwrite,
            inputs=[base, checkpoint],
        )
    logger.info(f"Converted {checkpoint} ({layout[0]} experts, top-{top_k}) to {output_dir}")
    return CLIPMoEModel.from_pretrained(output_dir).eval() if return_model else None


def build_converted(
    original: LazyCheckpoint, checkpoint, base, top_k: int, dtype: str, max_shard_size: int | str
) -> tuple[StreamedModel, tuple[int, list[int], list[int]]]:
    """The CLIPMoEModel of the release on the architecture of `base`, on the meta device, each weight converted from
    the release when it is written; and the release's layout (experts, vision and text MoE blocks). A release that
    does not fit `base` is refused, naming the keys and shapes at fault."""
    num_experts, vision_layers, text_layers = moe_layout(original)
    if top_k > num_experts:
        raise ValueError(f"--top_k {top_k} is more than the {num_experts} experts of {checkpoint}.")
    recipes = conversion_recipes(original, num_experts)
    text_positions = recipes["text_model.embeddings.position_embedding.weight"][0][0]

    config = clip_moe_config_from_dense(
        load_dense_clip_config(base),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        long_text=text_positions == LONG_CLIP_TEXT_LENGTH,
        text_moe_layers=text_layers,
        vision_moe_layers=vision_layers,
    )
    config.text_config.max_position_embeddings = text_positions
    output_dtype = resolve_dtype(dtype, checkpoint_dtype(None, original))
    with torch.device("meta"):  # every weight comes from the release: no initialisation needed
        model = CLIPMoEModel(config)
    model = model.to(output_dtype).eval()
    expected = planned_state_dict(model)
    missing = sorted(expected.keys() - recipes.keys())
    unexpected = sorted(recipes.keys() - expected.keys())
    wrong_shape = [
        f"{key}: checkpoint {tuple(recipes[key][0])} vs {base} architecture {tuple(expected[key].shape)}"
        for key in expected.keys() & recipes.keys()
        if recipes[key][0] != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{checkpoint} does not fit the architecture of {base}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatches {wrong_shape[:10]}"
        )

    def produce(name: str) -> torch.Tensor:
        _, keys, make = recipes[name]
        return make(*(original.get(key) for key in keys)).to(output_dtype)

    return StreamedModel(model, produce, max_shard_size=max_shard_size), (num_experts, vision_layers, text_layers)


def converted_card(checkpoint, base, config, layout: tuple[int, list[int], list[int]], dtype: str) -> CardSpec:
    """The card of a converted release: where it came from, its layout and the command line that converts it."""
    num_experts, vision_layers, text_layers = layout
    top_k, text_positions = config.num_experts_per_tok, config.text_config.max_position_embeddings
    options = {"base": base, "top_k": top_k, **({"dtype": dtype} if dtype not in (None, "auto") else {})}
    command = command_line("convert-clip-moe-original", [Path(checkpoint).name], options)
    how_built = (
        f"Converted from the official CLIP-MoE release file `{Path(checkpoint).name}` (OpenAI-CLIP naming) onto "
        f"the architecture of `{base}`: {num_experts} experts per MoE block, top-{top_k} routing (the release "
        f"does not record top-k; the paper uses 2), MoE blocks text {text_layers} and vision {vision_layers}, "
        f"{text_positions} text positions.\n\n```bash\n{command}\n```"
    )
    return CardSpec(base_model=str(base), how_built=how_built, tags=("clip-moe", "clip"))

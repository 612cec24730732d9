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
from pathlib import Path

import torch
from transformers.utils import logging

from ..fileio import check_output_dir
from ..hub import check_hub_model_id
from ..modeling import CLIPMoEModel
from ..modeling.configuration_clip_moe import LONG_CLIP_KEPT_POSITIONS, LONG_CLIP_TEXT_LENGTH
from .upcycle_clip import (
    clip_moe_config_from_dense,
    command_line,
    load_dense_clip_config,
    save_with_processor,
)


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


def load_original_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read an official `.pt` state dict (tensors only, no code executed), unwrapping `state_dict` / `module.`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"CLIP-MoE checkpoint {checkpoint} does not exist.")
    try:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Could not read {checkpoint} as a PyTorch state dict (corrupt or not a checkpoint?): {err}"
        ) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{checkpoint} does not hold a state dict of tensors.")
    return {key.removeprefix("module."): value for key, value in state_dict.items() if key not in IGNORED}


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


def convert_state_dict(original: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Rename, split and transpose an OpenAI-naming CLIP-MoE state dict into CLIPMoEModel's naming."""
    converted, experts, unknown = {}, defaultdict(dict), []
    for key, tensor in original.items():
        match = BLOCK_KEY.match(key)
        rest = match["rest"] if match else None
        prefix = f"{HF_TOWER[match['tower']]}.encoder.layers.{match['layer']}" if match else None
        if key in TOP_LEVEL:
            converted[TOP_LEVEL[key]] = tensor
        elif key in TRANSPOSED:
            converted[TRANSPOSED[key]] = tensor.t().contiguous()
        elif key in ("positional_embedding", "positional_embedding_res"):
            continue  # merged below
        elif rest in BLOCK_PARAMS:
            converted[f"{prefix}.{BLOCK_PARAMS[rest]}"] = tensor
        elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[-1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}.self_attn.{name}.{kind}"] = part.contiguous()
        elif rest and (expert := EXPERT_KEY.match(rest)):
            target = f"{prefix}.mlp.experts.{EXPERT_PARAM[expert['fc'], expert['kind']]}"
            experts[target][int(expert["expert"])] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unrecognised keys in the checkpoint: {sorted(unknown)[:10]}")
    for target, per_expert in experts.items():
        if sorted(per_expert) != list(range(num_experts)):
            raise ValueError(f"{target}: experts {sorted(per_expert)} found, expected 0..{num_experts - 1}.")
        converted[target] = torch.stack([per_expert[e] for e in range(num_experts)])
    converted["text_model.embeddings.position_embedding.weight"] = _text_positions(original)
    return converted


def _text_positions(original: dict[str, torch.Tensor]) -> torch.Tensor:
    """Long-CLIP adds a frozen copy (positions < 20) and a trained copy (the rest); we store the sum once."""
    if "positional_embedding" not in original:
        raise ValueError("The checkpoint has no `positional_embedding`.")
    positions = original["positional_embedding"]
    residual = original.get("positional_embedding_res")
    if residual is None:
        return positions
    if residual.shape != positions.shape:
        raise ValueError(
            f"positional_embedding {tuple(positions.shape)} vs positional_embedding_res {tuple(residual.shape)}."
        )
    return torch.cat([positions[:LONG_CLIP_KEPT_POSITIONS], residual[LONG_CLIP_KEPT_POSITIONS:]])


def convert_clip_moe_original(
    checkpoint: str | Path,
    base: str | Path,
    output_dir: str | Path,
    top_k: int = 2,
    overwrite: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    hub_private_repo: bool | None = None,
) -> CLIPMoEModel:
    """Convert an official CLIP-MoE `.pt` release into a CLIPMoEModel folder (safetensors + remote code + processor
    + model card).

    Args:
        checkpoint: The official state dict file.
        base: The dense CLIP it was built from (Hub id or folder): architecture and processor.
        output_dir: Where to write (atomically); it may not hold `checkpoint` or `base`.
        top_k: Experts per token (the official release uses 2; the checkpoint does not record it).
        push_to_hub: Upload the written folder to `hub_model_id` (default: the name of `output_dir`), with
            `hub_token` and, for a new repo, `hub_private_repo`.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    check_output_dir(output_dir, overwrite, inputs=[checkpoint, base])
    hub_model_id = check_hub_model_id(output_dir, push_to_hub, hub_model_id)
    original = load_original_state_dict(checkpoint)
    num_experts, vision_layers, text_layers = moe_layout(original)
    if top_k > num_experts:
        raise ValueError(f"--top_k {top_k} is more than the {num_experts} experts of {checkpoint}.")
    converted = convert_state_dict(original, num_experts)
    text_positions = converted["text_model.embeddings.position_embedding.weight"].shape[0]

    dense_config = load_dense_clip_config(base)
    config = clip_moe_config_from_dense(
        dense_config,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        long_text=text_positions == LONG_CLIP_TEXT_LENGTH,
        text_moe_layers=text_layers,
        vision_moe_layers=vision_layers,
    )
    config.text_config.max_position_embeddings = text_positions
    model = CLIPMoEModel(config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - converted.keys())
    unexpected = sorted(converted.keys() - expected.keys())
    wrong_shape = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs {base} architecture {tuple(expected[key].shape)}"
        for key in expected.keys() & converted.keys()
        if converted[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{checkpoint} does not fit the architecture of {base}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatches {wrong_shape[:10]}"
        )
    model.load_state_dict(converted)
    model.eval()

    command = command_line("convert-clip-moe-original", [Path(checkpoint).name], {"base": base, "top_k": top_k})
    how_built = (
        f"Converted from the official CLIP-MoE release file `{Path(checkpoint).name}` (OpenAI-CLIP naming) onto the "
        f"architecture of `{base}`: {num_experts} experts per MoE block, top-{top_k} routing (the release does not "
        f"record top-k; the paper uses 2), MoE blocks text {text_layers} and vision {vision_layers}, "
        f"{text_positions} text positions.\n\n```bash\n{command}\n```"
    )
    card = {
        "base_model": str(base),
        "how_built": how_built,
        "tags": ["clip-moe", "clip"],
        "model_name": hub_model_id or Path(output_dir).name,
    }
    save_with_processor(
        model,
        base,
        output_dir,
        overwrite,
        card=card,
        inputs=[checkpoint],
        push_to_hub=push_to_hub,
        hub_model_id=hub_model_id,
        hub_token=hub_token,
        hub_private_repo=hub_private_repo,
    )
    logger.info(f"Converted {checkpoint} ({num_experts} experts, top-{top_k}) to {output_dir}")
    return model

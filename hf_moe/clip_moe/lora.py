"""LoRA for CLIP-MoE with PEFT: a ready `LoraConfig`, the Trainer patterns that go with it, and merging the
adapters back into a plain `CLIPMoEModel` folder.

LoRA reaches two kinds of weights:

* the attention projections (`q_proj`, `k_proj`, `v_proj`, `out_proj`: `nn.Linear`, PEFT's usual `target_modules`);
* the packed experts (`mlp.experts.up_proj` `(E, I, H)` and `mlp.experts.down_proj` `(E, H, I)`: 3-D
  `nn.Parameter`s), through PEFT's `target_parameters`. PEFT wraps the experts module in a `lora.ParamWrapper` per
  parameter, which, for the duration of each forward, parametrizes the parameter as `W + scaling * B_e @ A_e` (one
  rank-`r` pair per expert). Every experts implementation reads the parameter through the module attribute, so
  `eager`, `batched_mm` and `grouped_mm` all see the adapted weights. PEFT's `ParamWrapper` refuses `lora_dropout`,
  DoRA, `lora_bias` and `fan_in_fan_out`.

Expert biases are not adapted (LoRA has none); routers can be trained fully (`routers_trainable=True`, through
`modules_to_save`, so they are saved with the adapter and merged back).

    from peft import get_peft_model
    from hf_moe.clip_moe.lora import clip_moe_lora_config, lora_trainable_parameters, merge_lora_into_folder

    config = clip_moe_lora_config(r=8, routers_trainable=True)
    model = get_peft_model(CLIPMoEModel.from_pretrained("clip-moe-l14"), config)
    args = CLIPMoETrainingArguments(..., trainable_parameters=lora_trainable_parameters(config))
    CLIPMoETrainer(model=model, args=args, ...).train()
    merge_lora_into_folder(model, "clip-moe-l14", "clip-moe-l14-lora-merged")
"""

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers.utils import logging

from ..arguments import HubArguments
from ..cards import CardSpec
from ..loading import load_clip_processor, load_config, load_pretrained
from ..modeling import CLIPMoEModel
from ..publish import check_destination, hub_keywords, write_model


logger = logging.get_logger(__name__)

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]
EXPERT_PARAMETERS = ["mlp.experts.up_proj", "mlp.experts.down_proj"]
ROUTER_MODULES = ["router"]
# Names that only exist while PEFT layers are in the model; none may survive a merge.
PEFT_NAME_PARTS = ("lora_", ".base_layer.", ".modules_to_save.", ".original_module.")


def clip_moe_lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    attention: bool = True,
    experts: bool = True,
    routers_trainable: bool = False,
    **lora_kwargs,
) -> LoraConfig:
    """A `peft.LoraConfig` for `CLIPMoEModel` (and its single-tower models).

    Args:
        r: LoRA rank (per expert for the experts: each expert gets its own rank-`r` pair).
        alpha: LoRA alpha (scaling `alpha / r`).
        dropout: LoRA dropout. PEFT cannot apply dropout to parameter-targeted LoRA, so it must be 0 when
            `experts=True`.
        attention: LoRA on `q_proj`, `k_proj`, `v_proj`, `out_proj` of every block of both towers.
        experts: LoRA on the packed expert weights `mlp.experts.up_proj` and `mlp.experts.down_proj` of every MoE
            block (not on their biases).
        routers_trainable: Train the routers fully, as `modules_to_save`: they are saved with the adapter and
            end up in the merged model. (Routers trained only through the Trainer's `trainable_parameters`
            are trained in place in the base model and are not part of a saved adapter.)
        lora_kwargs: Further `LoraConfig` fields (`init_lora_weights`, `use_rslora`, `rank_pattern`, ...).
    """
    if not attention and not experts:
        raise ValueError("clip_moe_lora_config needs attention=True or experts=True (nothing to adapt otherwise).")
    if experts and dropout:
        raise ValueError(
            f"dropout={dropout}: PEFT cannot apply LoRA dropout to the packed experts (targeted through "
            "`target_parameters`, where lora_B(lora_A(dropout(x))) cannot be factored out of the weight); "
            "use dropout=0.0 or experts=False."
        )
    modules_to_save = list(lora_kwargs.pop("modules_to_save", None) or [])
    if routers_trainable:
        modules_to_save += [name for name in ROUTER_MODULES if name not in modules_to_save]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # An empty list (not None) when only the experts are adapted: None would make PEFT look up default
        # targets for the model type, which it does not know.
        target_modules=list(ATTENTION_PROJECTIONS) if attention else [],
        target_parameters=list(EXPERT_PARAMETERS) if experts else None,
        modules_to_save=modules_to_save or None,
        bias="none",
        **lora_kwargs,
    )


def lora_trainable_parameters(lora_config: LoraConfig) -> list[str]:
    """`CLIPMoETrainingArguments.trainable_parameters` regexes for a model wrapped with `lora_config`: the LoRA
    factors and the trainable copies of `modules_to_save` (not their frozen `original_module`)."""
    patterns = [r"\.lora_[AB]\."]
    if lora_config.modules_to_save:
        patterns.append(r"\.modules_to_save\.")
    return patterns


def _torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).removeprefix("torch."), None)


def _merged_from_adapter_dir(adapter_dir: Path, base_model_dir, dtype) -> tuple[CLIPMoEModel, str | Path | None]:
    """Load the base in fp32, apply the saved adapter and merge it; cast to `dtype` (default: the base's)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"'{adapter_dir}' holds no adapter_config.json; is it a saved PEFT adapter?")
    if base_model_dir is None:
        base_model_dir = LoraConfig.from_pretrained(adapter_dir).base_model_name_or_path
        if not base_model_dir:
            raise ValueError(f"The adapter in '{adapter_dir}' names no base model; pass base_model_dir.")
    config = load_config(base_model_dir, require_moe=True)
    if dtype is None:
        dtype = _torch_dtype(config.dtype)
    base = load_pretrained(base_model_dir, CLIPMoEModel, config=config, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return (merged.to(dtype) if dtype is not None else merged), base_model_dir


@hub_keywords
def merge_lora_into_folder(
    peft_model_or_adapter_dir: PeftModel | str | Path,
    base_model_dir: str | Path | None,
    output_dir: str | Path,
    overwrite: bool = False,
    in_place: bool = False,
    dtype: torch.dtype | str | None = None,
    hub: HubArguments | None = None,
) -> CLIPMoEModel:
    """Merge LoRA adapters into their CLIP-MoE and save it as a plain `CLIPMoEModel` folder.

    The folder is written atomically and holds `model.safetensors`, `config.json` with its `auto_map`, the
    remote model code and the processor of `base_model_dir`, like an upcycled folder: it loads with
    `CLIPMoEModel.from_pretrained` or `AutoModel.from_pretrained(..., trust_remote_code=True)`, no PEFT needed.

    Args:
        peft_model_or_adapter_dir: A `PeftModel` around a `CLIPMoEModel` (merged as it is, including any
            non-LoRA weight trained in place, such as routers trained through the Trainer's
            `trainable_parameters`), or a folder saved by `PeftModel.save_pretrained` (applied to a fresh
            load of `base_model_dir`; only what the adapter holds is merged).
        base_model_dir: The CLIP-MoE folder or Hub id the adapter was trained on. The processor is taken from
            it; for an adapter folder, so is the model. `None`: the adapter config's `base_model_name_or_path`.
        output_dir: Where to write the merged model; must be empty or absent unless `overwrite`.
        in_place: For a `PeftModel`: merge it in place (no copy of the model in memory; the `PeftModel` is
            unusable afterwards). By default a deep copy is merged and the `PeftModel` is left untouched.
        dtype: For an adapter folder: dtype of the saved model (merged in fp32 first); default the base's.
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's). Default: no push.

    Returns:
        The merged `CLIPMoEModel` (also saved in `output_dir`), in eval mode.
    """
    is_folder = isinstance(peft_model_or_adapter_dir, (str, Path))
    inputs = [base_model_dir, peft_model_or_adapter_dir if is_folder else None]
    hub = check_destination(output_dir, overwrite, inputs, hub)
    merged, base_model_dir, lora_config = merged_lora_model(peft_model_or_adapter_dir, base_model_dir, in_place, dtype)
    card = CardSpec(
        base_model=base_model_dir,
        how_built=lora_how_built(lora_config, base_model_dir, peft_model_or_adapter_dir if is_folder else None),
        tags=("clip-moe", "clip", "lora", "peft"),
    )
    write_model(
        merged,
        output_dir,
        card=card,
        processor=load_clip_processor(base_model_dir, merged.config.text_config.max_position_embeddings),
        hub=hub,
        overwrite=overwrite,
        inputs=[base_model_dir, *inputs],
    )
    logger.info(f"Saved the merged CLIP-MoE to {output_dir}")
    return merged


def merged_lora_model(
    peft_model_or_adapter_dir: PeftModel | str | Path, base_model_dir, in_place: bool, dtype
) -> tuple[CLIPMoEModel, str | Path | None, LoraConfig]:
    """The merged `CLIPMoEModel` (eval mode), the base it was merged into and the adapter's `LoraConfig`; refuses
    anything but a CLIP-MoE, and a merge that left PEFT weights behind."""
    if isinstance(peft_model_or_adapter_dir, (str, Path)):
        merged, base_model_dir = _merged_from_adapter_dir(Path(peft_model_or_adapter_dir), base_model_dir, dtype)
        lora_config = LoraConfig.from_pretrained(peft_model_or_adapter_dir)
    elif isinstance(peft_model_or_adapter_dir, PeftModel):
        peft_model = peft_model_or_adapter_dir
        lora_config = peft_model.peft_config[peft_model.active_adapter]
        if base_model_dir is None:
            base_model_dir = lora_config.base_model_name_or_path or None
        model = peft_model if in_place else copy.deepcopy(peft_model)
        merged = model.merge_and_unload()
        if dtype is not None:
            merged = merged.to(_torch_dtype(dtype))
    else:
        raise TypeError(
            f"Expected a PeftModel or a saved adapter folder, got {type(peft_model_or_adapter_dir).__name__}."
        )
    if not isinstance(merged, CLIPMoEModel):
        raise TypeError(f"The adapter's base model is a {type(merged).__name__}, not a CLIPMoEModel.")
    leftovers = [name for name in merged.state_dict() if any(part in name for part in PEFT_NAME_PARTS)]
    if leftovers:
        raise RuntimeError(f"PEFT weights survived merge_and_unload: {leftovers[:5]}")
    return merged.eval(), base_model_dir, lora_config


def lora_how_built(lora_config: LoraConfig | None, base_model_dir, adapter_dir) -> str:
    """The card's "how it was built" section for a merged model."""
    source = f"the adapter folder `{adapter_dir}`" if adapter_dir is not None else "a PEFT model"
    lines = [f"LoRA adapters from {source} merged into the CLIP-MoE `{base_model_dir}` (PEFT `merge_and_unload`)."]
    if lora_config is not None:
        targets = sorted(lora_config.target_modules or []) + sorted(lora_config.target_parameters or [])
        lines.append(f"- rank {lora_config.r}, alpha {lora_config.lora_alpha}, targets {targets}")
        if lora_config.modules_to_save:
            lines.append(f"- trained in full: {sorted(lora_config.modules_to_save)}")
    return "\n".join(lines)


__all__ = [
    "ATTENTION_PROJECTIONS",
    "EXPERT_PARAMETERS",
    "clip_moe_lora_config",
    "lora_trainable_parameters",
    "merge_lora_into_folder",
]

"""Build a CLIPMoEModel from dense CLIP checkpoints (model_type 'clip'; hf-moe models are refused by their family).

* One base: sparse upcycling. Every expert is a copy of the dense MLP of its block; the routers start
  small and random, so the MoE computes exactly the dense function until the routers are trained.
* N bases (for example the N stage checkpoints of MCL): expert i of every MoE block is the MLP of base i.
  The bases must agree on every other weight (MCL trains only MLPs); otherwise we refuse and name the
  tensors that differ.

    hf-moe upcycle-clip openai/clip-vit-large-patch14 --num_experts 4 --top_k 2 --output_dir clip-moe
    hf-moe upcycle-clip mcl/stage0 mcl/stage1 mcl/stage2 mcl/stage3 --top_k 2 --long_text --output_dir clip-moe
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging

from ..arguments import HubArguments
from ..cards import CardSpec, command_line
from ..checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    LazyCheckpoint,
    StreamedModel,
    build_on_meta,
    check_checkpoint_fits,
    check_finite_options,
    checkpoint_dtype,
    meta_state_dict,
    planned_state_dict,
    resolve_dtype,
)
from ..loading import check_model_type, load_clip_processor, load_config
from ..modeling import CLIPMoEConfig, CLIPMoEModel, stretch_text_positions
from ..modeling.configuration_clip_moe import CLIP_TEXT_LENGTH, LONG_CLIP_TEXT_LENGTH
from ..publish import check_destination, hub_keywords, write_model


logger = logging.get_logger(__name__)

# `text_model.encoder.layers.3.mlp.fc1.weight` -> packed expert parameter `...layers.3.mlp.experts.up_proj`
DENSE_MLP_KEY = re.compile(
    r"^(?P<tower>text_model|vision_model)\.encoder\.layers\.(?P<layer>\d+)\.mlp\.(?P<param>fc[12]\.(weight|bias))$"
)
EXPERT_PARAM = {
    "fc1.weight": "up_proj",
    "fc1.bias": "up_proj_bias",
    "fc2.weight": "down_proj",
    "fc2.bias": "down_proj_bias",
}
# `...layers.3.mlp.experts.up_proj` -> `...layers.3.mlp.fc1.weight`
PACKED_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(text_model|vision_model)\.encoder\.layers\.\d+\.mlp)\.experts\.(?P<param>(up|down)_proj(_bias)?)$"
)
DENSE_PARAM = {packed: dense for dense, packed in EXPERT_PARAM.items()}
ROUTER_SUFFIX = ".mlp.router.weight"
TEXT_POSITIONS_KEY = "text_model.embeddings.position_embedding.weight"


# What `load_dense_clip_config` says the dense base is for.
UPCYCLE_BASE_ROLE = "upcycling (the BASE of hf-moe upcycle-clip, the --base of convert-clip-moe-original)"


def load_dense_clip_config(base: str | Path, role: str = UPCYCLE_BASE_ROLE) -> CLIPConfig:
    """The config of the dense CLIP `base` (no weights loaded); anything else is refused, naming `base`.

    Any hf-moe model is refused by its family: a CLIP-MoE's config is a `CLIPConfig` too, so `CLIPModel` would load
    it with freshly initialised MLPs (its experts have other names) and upcycle random weights without complaint; a
    WEMoE would lose its routers and task vectors."""
    config = load_config(base, require_moe=False)
    check_model_type(config, base, ("clip",), role)
    return config


class DenseCLIP:
    """The weights of a dense CLIP checkpoint, read lazily: the names and shapes its config's `CLIPModel` has
    (checked against the checkpoint before anything is read), each tensor in the dtype `from_pretrained` would
    load it in. Extra checkpoint entries (old checkpoints' `position_ids` buffers) are ignored, as
    `from_pretrained` ignores them."""

    def __init__(self, base: str | Path, config: CLIPConfig | None = None, label: str | None = None):
        self.base = base
        self.config = load_dense_clip_config(base) if config is None else config
        self.specs = meta_state_dict(lambda: CLIPModel(self.config))
        # `get` refuses a NaN or inf tensor, naming `label` and the tensor.
        self.checkpoint = LazyCheckpoint(base, label=label)
        check_checkpoint_fits(self.checkpoint, self.specs, base, "CLIP")
        self.dtype = checkpoint_dtype(self.config, self.checkpoint)

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name).to(self.dtype)

    def close(self) -> None:
        self.checkpoint.close()


def clip_moe_config_from_dense(
    dense_config: CLIPConfig, text_moe_layers=None, vision_moe_layers=None, **moe_kwargs
) -> CLIPMoEConfig:
    """A CLIPMoEConfig with the architecture of `dense_config`, the given MoE fields and, per tower, which
    blocks are MoE (`None`: all; an int n: the last n; a list: those indices)."""

    def tower(sub_config, moe_layers):
        fields = sub_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "dtype"):
            fields.pop(key, None)
        return {**fields, "moe_layers": moe_layers}

    return CLIPMoEConfig(
        text_config=tower(dense_config.text_config, text_moe_layers),
        vision_config=tower(dense_config.vision_config, vision_moe_layers),
        projection_dim=dense_config.projection_dim,
        logit_scale_init_value=dense_config.logit_scale_init_value,
        initializer_factor=dense_config.initializer_factor,
        **moe_kwargs,
    )


def differing_shared_tensors(bases: list[DenseCLIP], names: list[str]) -> list[str]:
    """Describe every non-MLP tensor that is not identical across the bases (empty when they all agree). Reads one
    tensor of two bases at a time."""
    reference, problems = bases[0], []
    for other, name in zip(bases[1:], names[1:]):
        if other.specs.keys() != reference.specs.keys():
            missing = sorted(reference.specs.keys() - other.specs.keys())[:5]
            extra = sorted(other.specs.keys() - reference.specs.keys())[:5]
            problems.append(f"{name}: different parameters (missing {missing}, extra {extra})")
            continue
        for key, spec in reference.specs.items():
            if other.specs[key].shape != spec.shape:
                problems.append(
                    f"{key}: shape {tuple(other.specs[key].shape)} in {name} vs {tuple(spec.shape)} in {names[0]}"
                )
            elif not DENSE_MLP_KEY.match(key) and not torch.equal(other.get(key), reference.get(key)):
                problems.append(f"{key} differs between {names[0]} and {name}")
    return problems


def upcycled_sources(config: CLIPMoEConfig, specs: dict, dense_specs: dict) -> dict[str, tuple[str, str | None]]:
    """Where each tensor of the CLIPMoEModel comes from: `("router", None)` (its random initialisation), `("experts",
    dense MLP key)` (stacked over the expert bases), `("positions", key)` (the text positions, stretched for
    Long-CLIP) or `("dense", key)` (the first base's). Raises when a tensor has no source or a shape cannot fit."""
    sources, missing = {}, []
    for name in specs:
        packed = PACKED_EXPERT_KEY.match(name)
        if name.endswith(ROUTER_SUFFIX):
            sources[name] = ("router", None)
        elif packed:
            sources[name] = ("experts", f"{packed['prefix']}.{DENSE_PARAM[packed['param']]}")
        elif name == TEXT_POSITIONS_KEY:
            sources[name] = ("positions", name)
        else:
            sources[name] = ("dense", name)
        key = sources[name][1]
        if key is not None and key not in dense_specs:
            missing.append(name)
    used = {key for _, key in sources.values()}
    unexpected = [key for key in dense_specs if key not in used]
    if missing or unexpected:
        raise RuntimeError(f"Upcycled state dict does not fit CLIPMoEModel: missing {missing}, unexpected {unexpected}")
    positions = dense_specs[TEXT_POSITIONS_KEY].shape[0]
    target = config.text_config.max_position_embeddings
    if positions != target and (positions, target) != (CLIP_TEXT_LENGTH, LONG_CLIP_TEXT_LENGTH):
        raise ValueError(f"{TEXT_POSITIONS_KEY} has {positions} positions; cannot make {target}.")
    return sources


@hub_keywords
def upcycle_clip(
    bases: list[str | Path] | str | Path,
    output_dir: str | Path,
    num_experts: int | None = None,
    top_k: int = 2,
    long_text: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    return_model: bool = True,
    hub: HubArguments | None = None,
    **moe_kwargs,
) -> CLIPMoEModel | None:
    """Upcycle one or several dense CLIP checkpoints into a CLIPMoEModel saved in `output_dir`.

    Each base must be a dense `CLIPModel` (model_type 'clip'): a CLIP-MoE, WEMoE, MoIIE or MoDE folder is refused,
    naming its family. NaN or inf in a base's tensors or in an option is refused, naming it, with nothing written.

    The bases are read one tensor at a time and the output written tensor by tensor (`hf_moe.checkpoint_io`), so
    memory holds about one packed expert tensor, never the dense models or the MoE.

    Args:
        bases: Hub ids or local folders of `CLIPModel`s. One base: every expert copies its MLP (sparse
            upcycling). Several: expert i comes from base i, all other weights must be identical.
        output_dir: Where the model, its remote code, the base's processor files and a model card are written
            (atomically: nothing is left behind on error). It may not hold any of the bases.
        num_experts: Experts per MoE block; required for one base, defaults to the number of bases.
        top_k: Experts per token.
        long_text: Stretch the text positions 77 -> 248 as Long-CLIP does.
        seed: Seed of the random router initialisation.
        dtype: Dtype of the written weights: "auto" (the first base's, as `from_pretrained` loads it), "float32",
            "bfloat16" or "float16".
        max_shard_size: Larger outputs are written as `model-0000i-of-0000N.safetensors` shards of at most this
            size with a `model.safetensors.index.json` (it does not change the memory used).
        return_model: Load the written model and return it; False returns None without reading it back (what the
            command line does: a real checkpoint need not be held in memory once written).
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's, default the base models' own where their
            cards state one). Default: no push.
        moe_kwargs: Further `CLIPMoEConfig` fields (`expert_dropout`, `router_aux_loss_coef`, ...) and
            per-tower `moe_layers` as `text_moe_layers` / `vision_moe_layers`.

    Returns:
        The upcycled model, loaded from `output_dir` (None when `return_model=False`).
    """
    bases, num_experts = check_upcycle_options(bases, num_experts, top_k, dtype, moe_kwargs)
    hub = check_destination(output_dir, overwrite, bases, hub)
    with open_dense_bases(bases) as dense:
        config = clip_moe_config_from_dense(
            dense[0].config, num_local_experts=num_experts, num_experts_per_tok=top_k, long_text=long_text, **moe_kwargs
        )
        model = build_upcycled(dense, config, seed, dtype, max_shard_size)
        write_model(
            model,
            output_dir,
            card=upcycle_card(bases, config, seed, dtype, moe_kwargs),
            processor=load_clip_processor(bases[0], config.text_config.max_position_embeddings),
            hub=hub,
            overwrite=overwrite,
            inputs=bases,
        )
    logger.info(f"Saved a {num_experts}-expert top-{top_k} CLIP-MoE from {len(bases)} base(s) to {output_dir}")
    return CLIPMoEModel.from_pretrained(output_dir).eval() if return_model else None


def check_upcycle_options(bases, num_experts: int | None, top_k: int, dtype: str, moe_kwargs: dict):
    """`upcycle_clip`'s checks that read no checkpoint: the bases as a list and the number of experts."""
    bases = [bases] if isinstance(bases, (str, Path)) else list(bases)
    if not bases:
        raise ValueError("upcycle_clip needs at least one base checkpoint.")
    if len(bases) == 1 and num_experts is None:
        raise ValueError("num_experts is required when upcycling a single base (sparse upcycling).")
    if len(bases) > 1 and num_experts not in (None, len(bases)):
        raise ValueError(f"num_experts={num_experts} but {len(bases)} bases were given: expert i comes from base i.")
    num_experts = len(bases) if num_experts is None else num_experts
    # Checked before any checkpoint is loaded (the config checks again, for users who build one by hand).
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}.")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}.")
    check_finite_options(moe_kwargs, "upcycle-clip option")
    resolve_dtype(dtype, torch.float32)  # an unknown name is refused before any work
    return bases, num_experts


@contextmanager
def open_dense_bases(bases: list) -> Iterator[list[DenseCLIP]]:
    """The bases opened lazily (`DenseCLIP`, each named in errors), closed on exit whatever happens."""
    labels = (
        [f"base '{bases[0]}'"]
        if len(bases) == 1
        else [f"base {i} of {len(bases)} ('{b}')" for i, b in enumerate(bases, 1)]
    )
    dense = []
    try:
        for base, label in zip(bases, labels):
            dense.append(DenseCLIP(base, label=label))
        yield dense
    finally:
        for opened in dense:
            opened.close()


def build_upcycled(
    dense: list[DenseCLIP], config: CLIPMoEConfig, seed: int, dtype: str, max_shard_size: int | str
) -> StreamedModel:
    """The CLIPMoEModel of `config` on the meta device, each weight produced when it is written: expert i of every
    block from the MLP of `dense[i]` (of the only base, for sparse upcycling), every other weight from the first
    base (refused unless all bases share it), routers from their random initialisation under `seed`."""
    problems = differing_shared_tensors(dense, [str(base.base) for base in dense])
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"The bases must share every non-MLP weight, but:\n  {shown}{more}")
    experts = dense if len(dense) > 1 else dense * config.num_local_experts
    output_dtype = resolve_dtype(dtype, dense[0].dtype)

    torch.manual_seed(seed)
    model, initial_value = build_on_meta(lambda: CLIPMoEModel(config))
    model = model.to(output_dtype).eval()
    model.config.name_or_path = ""
    sources = upcycled_sources(config, planned_state_dict(model), dense[0].specs)

    def produce(name: str) -> torch.Tensor:
        kind, key = sources[name]
        if kind == "router":
            return initial_value(name).to(output_dtype)
        if kind == "experts":
            read = {}  # sparse upcycling: one read per base, not per expert
            for base in experts:
                if id(base) not in read:
                    read[id(base)] = base.get(key)
            return torch.stack([read[id(base)] for base in experts]).to(output_dtype)
        tensor = dense[0].get(key)
        if kind == "positions" and tensor.shape[0] != config.text_config.max_position_embeddings:
            tensor = stretch_text_positions(tensor)
        return tensor.to(output_dtype)

    return StreamedModel(model, produce, max_shard_size=max_shard_size)


# `upcycle_clip` keyword arguments worth repeating in the card's command line (the rest are Python-only).
CARD_OPTIONS = ("expert_dropout", "router_aux_loss_coef")


def upcycle_card(bases: list, config: CLIPMoEConfig, seed: int, dtype: str, moe_kwargs: dict) -> CardSpec:
    """The card of an upcycled model: its bases, the method and the command line that rebuilds it."""
    options = {
        "num_experts": config.num_local_experts if len(bases) == 1 else None,
        "top_k": config.num_experts_per_tok,
        "long_text": config.long_text,
    }
    options.update({key: value for key, value in moe_kwargs.items() if key in CARD_OPTIONS})
    if dtype not in (None, "auto"):
        options["dtype"] = dtype
    return CardSpec(
        base_model=[str(base) for base in bases],
        how_built=upcycle_how_built(bases, config, seed, command_line("upcycle-clip", bases, options, seed=seed)),
        tags=("clip-moe", "clip", "upcycling"),
    )


def upcycle_how_built(bases: list, config: CLIPMoEConfig, seed: int, command: str) -> str:
    """The card's "how it was built" section for an upcycled model."""
    experts, top_k = config.num_local_experts, config.num_experts_per_tok
    if len(bases) == 1:
        method = (
            f"**Sparse upcycling** of the dense CLIP `{bases[0]}`: each of the {experts} experts of every MoE block "
            "is a copy of that block's MLP, and the routers start small and random (seed "
            f"{seed}), so the model computes the dense model's function until its routers are trained "
            "(`hf-moe train-router`)."
        )
    else:
        listed = "\n".join(f"{i}. `{base}`" for i, base in enumerate(bases))
        method = (
            "**Diversified multiplet upcycling** (CLIP-MoE): expert *i* of every MoE block is the MLP of base *i*, "
            "every other weight is shared (identical in all bases, checked); routers start random "
            f"(seed {seed}).\n\nExpert bases:\n\n{listed}"
        )
    towers = (
        f"- {experts} experts per MoE block, top-{top_k} routing\n"
        f"- text MoE blocks: {config.text_config.moe_layer_indices()}; "
        f"vision MoE blocks: {config.vision_config.moe_layer_indices()}\n"
        f"- text length: {config.text_config.max_position_embeddings} positions"
        + (" (Long-CLIP stretched)" if config.long_text else "")
    )
    return f"{method}\n\n{towers}\n\n```bash\n{command}\n```"

"""Build a MoIIE vision-language model (SigLIP -> mlp2x_gelu projector -> Phi-3 with vision / shared / language
experts) by sparse upcycling of dense checkpoints: every expert of every MoE layer is a copy of that layer's
dense MLP and the routers start N(0, 0.02), so the model computes the dense LVLM's function until trained.
A plain LLM's tokenizer becomes a `MoIIEProcessor`. As LLaVA does, `<image>` is added to it as a special token
when missing (real Phi-3 and Llama-3 tokenizers have none); when the new id falls outside the LM's embedding rows
(Llama-3: exactly 128256 rows for 128256 tokens) the embeddings and lm_head grow by `resize_token_embeddings`
(new rows mean-initialised, rows padded to a multiple of 64), so the logits over the old vocabulary stay the dense
model's. The processor's chat template is the tokenizer's own only if it renders `{"type": "image"}` items as
`<image>`; otherwise (Phi-3's and Llama-3's own templates are text-only) the decoder's image-aware one
(`CHAT_TEMPLATES`: the same special tokens and turn format), which the folder's tokenizer then shares.

    hf-moe upcycle-moiie --base microsoft/Phi-3-mini-4k-instruct --vision google/siglip-so400m-patch14-384 \
        --num_vision_experts 1 --num_shared_experts 2 --num_language_experts 1 --top_k 2 --output_dir moiie
    hf-moe upcycle-moiie --base my-dense-llava-phi3 --output_dir moiie     # a LlavaForConditionalGeneration folder
"""

import copy
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from ..arguments import HubArguments
from ..cards import IMAGE_TEXT_TO_TEXT, IMAGE_TEXT_TO_TEXT_USAGE, CardSpec, command_line
from ..checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    LazyCheckpoint,
    StreamedModel,
    build_on_meta,
    check_finite,
    checkpoint_dtype,
    from_pretrained_names,
    planned_state_dict,
    resolve_dtype,
)
from ..loading import check_safetensors_file, load_config
from ..modeling import (
    MoIIEConfig,
    MoIIEForCausalLM,
    MoIIELlamaForCausalLM,
    MoIIEPhi3ForCausalLM,
    MoIIEProcessor,
    num_image_tokens_of,
)
from ..modeling.processing_moiie import CHAT_TEMPLATES
from ..publish import check_destination, hub_keywords, write_model


logger = logging.get_logger(__name__)

VISION_TYPES = ("siglip", "siglip_vision_model")
TEXT_TYPES = ("phi3", "llama")
IMAGE_TOKEN = "<image>"
# transformers' and LLaVA's customary padding of a resized vocabulary (tensor-core friendly row counts).
PAD_VOCAB_TO = 64
# Tokenizer / processor files of the LLM (or LLaVA) folder copied next to the model when present.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# Projector keys accepted in a `projector` folder: LLaVA / hf-moe names, or Bunny's `mm_projector.0` / `.2`.
PROJECTOR_KEYS = {"linear_1": ("linear_1", "mm_projector.0"), "linear_2": ("linear_2", "mm_projector.2")}


def _vision_config(vision, config):
    if config.model_type not in VISION_TYPES:
        raise ValueError(
            f"'{vision}' is a '{config.model_type}' model; vision needs a SigLIP (model_type {VISION_TYPES})."
        )
    return config.vision_config if config.model_type == "siglip" else config


def _check_phi3(name, text_config, key="model_type"):
    if text_config.model_type not in TEXT_TYPES:
        raise ValueError(
            f"'{name}' has {key}={text_config.model_type!r}; upcycle-moiie needs a Phi-3 ('phi3') or a Llama ('llama')."
        )
    if getattr(text_config, "mlp_bias", False):
        raise ValueError(f"'{name}' has mlp_bias=True; MoIIE's packed experts are bias-free.")


def read_projector(folder: str | Path) -> dict[str, torch.Tensor]:
    """`linear_1.weight/bias`, `linear_2.weight/bias` from the safetensors (or .bin) files of `folder`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"projector '{folder}' is not a folder.")
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path)
        state.update(load_file(path))
    for path in sorted(folder.glob("*.bin")) if not state else []:
        state.update(_load_projector_bin(path))
    out = {}
    for name, aliases in PROJECTOR_KEYS.items():
        for param in ("weight", "bias"):
            hits = [v for k, v in state.items() for a in aliases if k == f"{a}.{param}" or k.endswith(f".{a}.{param}")]
            if len(hits) != 1:
                raise ValueError(
                    f"projector '{folder}' must hold exactly one '{name}.{param}' (or {aliases[1]}.{param}); "
                    f"found {len(hits)} among {sorted(state)[:10]}."
                )
            out[f"{name}.{param}"] = hits[0]
    return out


def _pickled_objects_refused(source, err) -> ValueError:
    """The one-line refusal of a pickled weights file that holds Python objects besides tensors (`weights_only`
    loading stops at the first one, so nothing of it runs)."""
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return ValueError(
        f"'{source}' holds a pickled weights file with Python objects besides tensors, which hf-moe refuses to load "
        f"(they could run any code; {reason}). Use weights saved as safetensors, or re-save them from a source you "
        "trust as a plain state dict."
    )


def _lazy_checkpoint(source, **kwargs) -> LazyCheckpoint:
    try:
        return LazyCheckpoint(source, **kwargs)
    except pickle.UnpicklingError as err:
        raise _pickled_objects_refused(source, err) from None


def _load_projector_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled projector file (LLaVA's `mm_projector.bin`), loaded with `weights_only`: a file that
    holds other Python objects is refused with one line and never run (a pickle can execute any code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _pickled_objects_refused(f"projector file {path}", err) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise OSError(f"projector file '{path}' is corrupt or truncated ({' '.join(str(err).split())}).") from err
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"projector file '{path}' must hold a dict of tensors, got {type(state).__name__}.")
    return state


def check_projector(projector: dict, vision_hidden: int, text_hidden: int, name: str) -> None:
    expected = {
        "linear_1.weight": (text_hidden, vision_hidden),
        "linear_1.bias": (text_hidden,),
        "linear_2.weight": (text_hidden, text_hidden),
        "linear_2.bias": (text_hidden,),
    }
    for key, shape in expected.items():
        if tuple(projector[key].shape) != shape:
            raise ValueError(
                f"{name}: {key} has shape {tuple(projector[key].shape)}, but the vision hidden_size {vision_hidden} "
                f"and the language model's hidden_size {text_hidden} need {shape}."
            )


# `model.language_model.layers.3.mlp.experts.gate_up_proj`: a packed MoIIE expert parameter.
PACKED_EXPERT_KEY = re.compile(r"^(?P<prefix>model\.language_model\.layers\.\d+\.mlp)\.experts\.(?P<param>\w+)$")


class DenseWeights:
    """The dense weights a MoIIE is upcycled from, under MoIIE's names, read lazily from the checkpoints they are
    in: each tensor in the dtype `from_pretrained` would have loaded its model in. A few small or changed tensors
    (the projector, resized embeddings) are held in memory."""

    def __init__(self):
        self.entries, self.tensors, self.checkpoints = {}, {}, []

    def add_checkpoint(self, checkpoint: LazyCheckpoint, rename, dtype: torch.dtype) -> None:
        """Expose `checkpoint`'s tensors as `rename(name)` (None: not used)."""
        self.checkpoints.append(checkpoint)
        for key in checkpoint:
            name = rename(key)
            if name is not None:
                self.entries[name] = (checkpoint, key, dtype)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor

    def names(self) -> set[str]:
        return set(self.entries) | set(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors or name in self.entries

    def get(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        checkpoint, key, dtype = self.entries[name]
        return checkpoint.get(key).to(dtype)

    def close(self) -> None:
        for checkpoint in self.checkpoints:
            checkpoint.close()


def upcycle_sources(
    config: MoIIEConfig, names, dense: DenseWeights, initialised: tuple[str, ...], tied: set[str] = frozenset()
) -> dict:
    """Where each MoIIE tensor comes from: `("init", [])` (its random initialisation: routers, and a projector
    nobody gave), `("experts", dense keys)` (the MLP of an MoE layer, Llama's gate and up fused, copied into every
    expert) or `("dense", [key])`. Raises RuntimeError naming what has no source or what is left unused (but `tied`:
    names the MoIIE ties to another, not written)."""
    moe = set(config.moe_layers) if config.variant != "dense" else set()
    sources, missing = {}, []
    for name in names:
        packed = PACKED_EXPERT_KEY.match(name)
        if any(part in name for part in initialised):
            sources[name] = ("init", [])
        elif packed and int(name.split(".")[3]) in moe:
            prefix, param = packed["prefix"], packed["param"]
            if param == "gate_up_proj" and f"{prefix}.gate_up_proj.weight" not in dense:  # Llama: separate gate / up
                keys = [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"]
            else:
                keys = [f"{prefix}.{param}.weight"]
            sources[name] = ("experts", keys)
        else:
            sources[name] = ("dense", [name])
        if any(key not in dense for key in sources[name][1]):
            missing.append(name)
    used = {key for _, keys in sources.values() for key in keys}
    unexpected = sorted(dense.names() - used - set(tied))
    if missing or unexpected:
        raise RuntimeError(f"Upcycled state dict does not fit the MoIIE: missing {missing}, unexpected {unexpected}")
    return sources


def _meta(build):
    with torch.device("meta"):
        return build()


@hub_keywords
def upcycle_moiie(
    llm: str | Path,
    vision: str | Path | None,
    output_dir: str | Path,
    *,
    num_vision_experts: int = 1,
    num_shared_experts: int = 2,
    num_language_experts: int = 1,
    top_k: int = 2,
    variant: str = "moiie",
    moe_layers: list[int] | None = None,
    projector: str | Path | None = None,
    image_token_id: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    return_model: bool = True,
    hub: HubArguments | None = None,
) -> MoIIEForCausalLM | None:
    """Upcycle a dense Phi-3 or Llama + SigLIP (+ projector), or a dense LLaVA-style folder, into a MoIIE in
    `output_dir`.

    Args:
        llm: A dense `Phi3ForCausalLM` or `LlamaForCausalLM` (Hub id or folder), or a `LlavaForConditionalGeneration`
            with a SigLIP vision config and a Phi-3 or Llama text config (then `vision` must be None: tower,
            projector and LM come from it).
        vision: A `SiglipVisionModel` or `SiglipModel` (its vision tower is taken).
        output_dir: Written atomically (nothing left behind on error); may not hold an input.
        num_vision_experts, num_shared_experts, num_language_experts: Experts per MoE layer.
        top_k: Experts per token of each router.
        variant: "moiie", "vanilla", "modality" or "dense".
        moe_layers: MoE decoder-layer indices (default the odd ones).
        projector: A folder with the mlp2x_gelu weights (`linear_1/2` or Bunny's `mm_projector.0/2`); when absent
            (and `llm` is not a LLaVA folder) the projector is random-initialised, as the card says.
        image_token_id: The image placeholder id (default: the LLaVA config's, else the id of the tokenizer's
            `<image>`, added when missing; MoIIEConfig's 32044 when `llm` has no tokenizer). With a tokenizer it must
            be that `<image>` id, else a `ValueError` naming both.
        seed: Seed of the router (and random projector) initialisation.
        dtype: Dtype of the written weights: "auto" (the language model's, as `from_pretrained` loads it; the vision
            tower and projector are cast to it), "float32", "bfloat16" or "float16".
        max_shard_size: Larger outputs are written as `model-0000i-of-0000N.safetensors` shards of at most this size
            with a `model.safetensors.index.json`.
        return_model: Load the written model and return it; False returns None without reading it back (the command
            line's choice: a real checkpoint need not be held in memory once written).
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's, default the base models' own where their
            cards state one). Default: no push.

    The checkpoints are read one tensor at a time and the MoIIE, built on the meta device (its routers replayed from
    `seed`), is written tensor by tensor (`hf_moe.checkpoint_io`): memory holds about one packed expert tensor, never
    the dense model or the MoIIE, so the full Phi-3-mini + SigLIP-so400m MoIIE (~16 GB in bf16) upcycles in far less
    memory than its size.
    """
    moe_fields = dict(
        moe_layers=moe_layers,
        num_vision_experts=num_vision_experts,
        num_shared_experts=num_shared_experts,
        num_language_experts=num_language_experts,
        num_experts_per_tok=top_k,
        variant=variant,
    )
    plan = check_upcycle_moiie(llm, vision, output_dir, projector, image_token_id, moe_fields, overwrite, dtype, hub)
    config = plan.config
    dense = DenseWeights()
    try:
        output_dtype = resolve_dtype(dtype, add_dense_weights(dense, plan, llm, vision, seed))
        random_projector = not plan.is_llava and projector is None
        model, produce = build_moiie(plan, dense, output_dtype, seed, random_projector)
        write_model(
            StreamedModel(model, produce, max_shard_size=max_shard_size),
            output_dir,
            card=moiie_card(llm, vision, projector, plan, seed, dtype),
            processor=(None if plan.tokenizer is None else moiie_processor(plan.tokenizer, vision, config))
            or _Files(llm),
            hub=plan.hub,
            overwrite=overwrite,
            inputs=[llm, vision, projector],
        )
    finally:
        dense.close()
    logger.info(f"Saved a {config.num_local_experts}-expert {variant} MoIIE to {output_dir}")
    return type(model).from_pretrained(output_dir).eval() if return_model else None


@dataclass
class UpcyclePlan:
    """What `check_upcycle_moiie` found, for the build and the card: the LLM's (or LLaVA's) config and its text
    config, the MoIIE config to build, the tokenizer (None: the LLM has none, or is a LLaVA folder) and whether
    `<image>` was added to it, the LM's embedding rows, the projector's tensors (None: none given) and the repo to
    push to (`hub`, as `hf_moe.publish.check_destination` fills it in)."""

    llm_config: object
    is_llava: bool
    text_config: object
    config: MoIIEConfig
    tokenizer: object
    added_image_token: bool
    rows: int
    projector_state: dict | None
    hub: HubArguments


def check_upcycle_moiie(
    llm, vision, output_dir, projector, image_token_id, moe_fields: dict, overwrite: bool, dtype: str, hub
) -> UpcyclePlan:
    """Every check before a weight is read and anything is written: the inputs' configs, the tokenizer's `<image>`,
    the MoIIE config (`moe_fields`: its MoE fields), the projector, the output folder and Hub repo."""
    resolve_dtype(dtype, torch.float32)  # an unknown name is refused before any work
    llm_config = load_config(llm, require_moe=False)
    is_llava = llm_config.model_type == "llava"
    if is_llava:
        vision_config, text_config, feature_layer = check_llava(llm, vision, llm_config)
        image_token_id = llm_config.image_token_id if image_token_id is None else image_token_id
    else:
        _check_phi3(llm, llm_config)
        if vision is None:
            raise ValueError(f"'{llm}' is a plain {llm_config.model_type} LLM: pass vision (a SigLIP) as well.")
        vision_config = _vision_config(vision, load_config(vision, require_moe=False))
        text_config, feature_layer = llm_config, -2
    tokenizer = None if is_llava else load_tokenizer(llm)
    added_image_token = tokenizer is not None and add_image_token(tokenizer)
    if tokenizer is not None:
        image_token_id = check_image_token_id(tokenizer, image_token_id, llm)
    image_token_id = 32044 if image_token_id is None else image_token_id
    rows = text_config.vocab_size
    # only a token we add may grow the embeddings; an existing id must already have its row
    vocab_size = padded_vocab(len(tokenizer)) if added_image_token and image_token_id >= rows else rows
    if not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id={image_token_id} is outside the LLM's vocab_size {rows}.")
    config = MoIIEConfig(
        vision_config=vision_config.to_dict(),
        text_config={**text_config.to_dict(), "vocab_size": vocab_size},
        **moe_fields,
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
    )  # validates the MoE fields (top-k vs each router, moe_layers), naming the key
    projector_state = None if projector is None else checked_projector(projector, vision_config, text_config)
    hub = check_destination(output_dir, overwrite, [llm, vision, projector], hub)
    return UpcyclePlan(
        llm_config, is_llava, text_config, config, tokenizer, added_image_token, rows, projector_state, hub
    )


def check_llava(llm, vision, llm_config) -> tuple:
    """`(vision_config, text_config, vision_feature_layer)` of a dense LLaVA folder, after checking that MoIIE can
    upcycle it exactly: no separate `vision`, a SigLIP tower, a Phi-3 or Llama decoder, every vision token fed to
    an mlp2x_gelu projector with biases, one feature layer."""
    if vision is not None:
        raise ValueError(f"'{llm}' is a LLaVA folder with its own vision tower; leave vision unset.")
    vision_config = _vision_config(llm, llm_config.vision_config)
    _check_phi3(llm, llm_config.text_config, key="text_config.model_type")
    if llm_config.vision_feature_select_strategy != "full":
        raise ValueError(
            f"'{llm}' has vision_feature_select_strategy={llm_config.vision_feature_select_strategy!r}; "
            "MoIIE feeds every vision token to the projector, so only 'full' upcycles exactly."
        )
    if llm_config.projector_hidden_act != "gelu" or not getattr(llm_config, "multimodal_projector_bias", True):
        raise ValueError(
            f"'{llm}' has projector_hidden_act={llm_config.projector_hidden_act!r} / multimodal_projector_bias="
            f"{getattr(llm_config, 'multimodal_projector_bias', True)}; "
            "MoIIE's mlp2x_gelu needs 'gelu' with biases."
        )
    feature_layer = llm_config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"'{llm}' has vision_feature_layer={feature_layer!r}; MoIIE takes one layer (an int).")
    return vision_config, llm_config.text_config, feature_layer


def checked_projector(projector, vision_config, text_config) -> dict[str, torch.Tensor]:
    """The projector folder's `linear_1/2` tensors, their shapes checked against the tower and the LM and their
    values finite (the checkpoints' tensors are checked as they are read)."""
    projector_state = read_projector(projector)
    check_projector(projector_state, vision_config.hidden_size, text_config.hidden_size, f"projector '{projector}'")
    for key, tensor in projector_state.items():
        check_finite(tensor, key, f"projector '{projector}'")
    return projector_state


def add_dense_weights(dense: DenseWeights, plan: UpcyclePlan, llm, vision, seed: int) -> torch.dtype:
    """Expose the dense checkpoints' tensors (and the projector's, and resized embeddings) in `dense` under the
    MoIIE's names; returns the language model's dtype as `from_pretrained` loads it."""
    llm_config, text_config = plan.llm_config, plan.text_config
    if plan.is_llava:
        from transformers import LlavaForConditionalGeneration

        meta = _meta(lambda: LlavaForConditionalGeneration(copy.deepcopy(llm_config)))
        checkpoint = _lazy_checkpoint(llm, key_mapping=from_pretrained_names(meta))
        input_dtype = checkpoint_dtype(llm_config, checkpoint)
        dense.add_checkpoint(checkpoint, lambda name: name, input_dtype)  # LLaVA's names are MoIIE's
        if "lm_head.weight" not in dense and text_config.tie_word_embeddings:
            dense.add_checkpoint(
                checkpoint,
                lambda name: "lm_head.weight" if name == "model.language_model.embed_tokens.weight" else None,
                input_dtype,
            )
    else:
        from transformers import AutoModel, LlamaForCausalLM, Phi3ForCausalLM

        lm_class = {"phi3": Phi3ForCausalLM, "llama": LlamaForCausalLM}[llm_config.model_type]
        meta_lm = _meta(lambda: lm_class(copy.deepcopy(llm_config)))
        lm = _lazy_checkpoint(llm, key_mapping=from_pretrained_names(meta_lm))
        input_dtype = checkpoint_dtype(llm_config, lm)
        dense.add_checkpoint(lm, lm_name, input_dtype)
        if "lm_head.weight" not in dense and llm_config.tie_word_embeddings:
            dense.add_checkpoint(
                lm, lambda n: "lm_head.weight" if n == "model.embed_tokens.weight" else None, input_dtype
            )
        if plan.config.text_config.vocab_size != plan.rows:
            resized = resized_embeddings(meta_lm, dense, len(plan.tokenizer), seed)
            for name, tensor in resized.items():
                dense.add_tensor(name, tensor)
        vision_full_config = load_config(vision, require_moe=False)
        meta_tower = _meta(lambda: AutoModel.from_config(copy.deepcopy(vision_full_config)))
        tower = _lazy_checkpoint(vision, key_mapping=from_pretrained_names(meta_tower))
        rename = vision_name(is_full_siglip=hasattr(meta_tower, "text_model"))
        dense.add_checkpoint(tower, rename, checkpoint_dtype(vision_full_config, tower))
    for key, value in (plan.projector_state or {}).items():
        dense.add_tensor(f"model.multi_modal_projector.{key}", value)
    return input_dtype


def build_moiie(plan: UpcyclePlan, dense: DenseWeights, output_dtype, seed: int, random_projector: bool):
    """The MoIIE on the meta device (routers, and a `random_projector`, replayed from `seed`) and its
    `produce(name)` for `StreamedModel`: every expert of an MoE layer a copy of the layer's dense MLP, the rest the
    dense tensor, all in `output_dtype`."""
    config = plan.config
    model_class = {"phi3": MoIIEPhi3ForCausalLM, "llama": MoIIELlamaForCausalLM}[plan.text_config.model_type]
    torch.manual_seed(seed)
    model, initial_value = build_on_meta(lambda: model_class(config))
    model = model.to(output_dtype).eval()
    model.config.name_or_path = ""
    initialised = ("router.weight",) + (("multi_modal_projector.",) if random_projector else ())
    planned = planned_state_dict(model)
    sources = upcycle_sources(config, planned, dense, initialised, tied=model.state_dict().keys() - planned.keys())
    num_experts = config.num_local_experts

    def produce(name: str) -> torch.Tensor:
        kind, keys = sources[name]
        if kind == "init":
            return initial_value(name).to(output_dtype)
        tensors = [dense.get(key) for key in keys]
        if kind == "dense":
            return tensors[0].to(output_dtype)
        value = torch.cat(tensors) if len(tensors) > 1 else tensors[0]  # Llama: [gate; up] as the experts fuse
        return value.unsqueeze(0).expand(num_experts, *value.shape).to(output_dtype).contiguous()

    return model, produce


def moiie_card(llm, vision, projector, plan: UpcyclePlan, seed: int, dtype: str) -> CardSpec:
    """The card of an upcycled MoIIE: how it was upcycled (`how_built`), its usage (a vision-language model's)."""
    how = how_built(
        llm,
        vision,
        projector,
        plan.is_llava,
        plan.config,
        seed,
        image_token_note(plan.added_image_token, plan.config, plan.rows),
        dtype=None if dtype in (None, "auto") else dtype,
    )
    return CardSpec(
        base_model=[str(x) for x in (llm, vision) if x is not None],
        how_built=how,
        tags=("moiie", plan.text_config.model_type, "siglip", "vision-language", "upcycling"),
        pipeline_tag=IMAGE_TEXT_TO_TEXT,
        usage=IMAGE_TEXT_TO_TEXT_USAGE,
    )


def lm_name(name: str) -> str | None:
    """A dense Phi-3 / Llama name -> the MoIIE's: its decoder under `model.language_model`, the same LM head."""
    if name.startswith("model."):
        return f"model.language_model.{name.removeprefix('model.')}"
    return name if name == "lm_head.weight" else None


def vision_name(is_full_siglip: bool):
    """SigLIP names -> the MoIIE's vision tower (a `SiglipVisionModel`): a `SiglipModel`'s `vision_model.*` (its
    text tower, logit scale and bias are left out), or every name of a `SiglipVisionModel`."""
    tower = "model.vision_tower."

    def rename(name: str) -> str | None:
        if not is_full_siglip:
            return tower + name
        return tower + name.removeprefix("vision_model.") if name.startswith("vision_model.") else None

    return rename


def resized_embeddings(meta_lm, dense: DenseWeights, num_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """The LM's input embeddings and head after `resize_token_embeddings(num_tokens, pad_to_multiple_of=64)` under
    `seed`, as upcycling a loaded LM gives them (the new rows mean-initialised), with only these two tensors real:
    the rest of `meta_lm` stays on the meta device."""
    from torch import nn

    embed = dense.get("model.language_model.embed_tokens.weight")
    old = meta_lm.get_input_embeddings()
    embeddings = nn.Embedding(*embed.shape, padding_idx=old.padding_idx, _weight=embed, dtype=embed.dtype)
    meta_lm.set_input_embeddings(embeddings)
    head = nn.Linear(embed.shape[1], embed.shape[0], bias=False, device="meta")
    if meta_lm.config.tie_word_embeddings:
        head.weight = embeddings.weight
    else:
        head.weight = nn.Parameter(dense.get("lm_head.weight"))
    meta_lm.set_output_embeddings(head)
    torch.manual_seed(seed)  # mean_resizing samples the new rows around the old rows' mean
    meta_lm.resize_token_embeddings(num_tokens, pad_to_multiple_of=PAD_VOCAB_TO)
    return {
        "model.language_model.embed_tokens.weight": meta_lm.get_input_embeddings().weight.detach(),
        "lm_head.weight": meta_lm.get_output_embeddings().weight.detach(),
    }


def load_tokenizer(llm):
    """The tokenizer of `llm`, or None (its files, if any, are then copied as they are) when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(llm)
    except (OSError, ValueError) as err:
        logger.info(f"No tokenizer in '{llm}' ({err}); the upcycled folder gets no processor.")
        return None


def add_image_token(tokenizer) -> bool:
    """Add `<image>` as a special token unless the tokenizer already encodes it as one token; True if added."""
    from tokenizers import AddedToken

    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) == 1:
        return False
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return True


def check_image_token_id(tokenizer, image_token_id: int | None, llm) -> int:
    """The tokenizer's `<image>` id; a requested `image_token_id` must be it, since the processor can only ever
    write that id into prompts."""
    token_id = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)[0]
    if image_token_id is not None and image_token_id != token_id:
        raise ValueError(
            f"image_token_id={image_token_id} is not the id of {IMAGE_TOKEN!r} in the tokenizer of '{llm}' "
            f"({len(tokenizer)} tokens), which is {token_id}: leave image_token_id unset or pass {token_id}."
        )
    return token_id


def padded_vocab(num_tokens: int) -> int:
    """The embedding rows `resize_token_embeddings(num_tokens, pad_to_multiple_of=PAD_VOCAB_TO)` gives."""
    return -(-num_tokens // PAD_VOCAB_TO) * PAD_VOCAB_TO


def image_token_note(added: bool, config: MoIIEConfig, rows: int) -> str | None:
    """The model card's line on the `<image>` token upcycling added, None when the tokenizer had it."""
    if not added:
        return None
    note = f"`{IMAGE_TOKEN}` was added to the tokenizer as special token id {config.image_token_id}"
    vocab_size = config.text_config.vocab_size
    if vocab_size == rows:
        return f"{note}; it fits the LM's {rows} embedding rows, so no row was added."
    return (
        f"{note}; the embeddings and lm_head grew from {rows} to {vocab_size} rows (new rows mean-initialised), so "
        f"the logits over ids 0..{rows - 1} are the dense model's and ids {rows}.. are new."
    )


def moiie_processor(tokenizer, vision, config: MoIIEConfig) -> MoIIEProcessor:
    """A `MoIIEProcessor` for the upcycled model from a tokenizer holding `<image>` (`add_image_token`) and the
    image processor of `vision` (a SigLIP one for the tower's image size when `vision` has none)."""
    from transformers import AutoImageProcessor

    try:
        image_processor = AutoImageProcessor.from_pretrained(vision)
    except (OSError, ValueError, ImportError):
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        size = config.vision_config.image_size
        image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    template = tokenizer.chat_template
    if not renders_images(tokenizer, template):
        template = CHAT_TEMPLATES.get(config.text_config.model_type)
    # the processor's chat_template.jinja is the folder's only one, so the reloaded tokenizer gets it as well
    tokenizer.chat_template = template
    return MoIIEProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=num_image_tokens_of(config.vision_config),
        image_token=IMAGE_TOKEN,
        chat_template=template,
    )


def renders_images(tokenizer, template: str | None) -> bool:
    """Whether `template` writes one `<image>` for an image item (text-only templates render the item list as a
    string, or fail on it)."""
    if not template:
        return False
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    try:
        prompt = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:  # whatever a text-only template raises on list content, it renders no image
        return False
    return prompt.count(IMAGE_TOKEN) == 1


class _Files:
    """Stands in for a processor: `save_pretrained` copies the tokenizer / processor files of a local `llm` folder."""

    def __init__(self, source):
        self.source = Path(source)

    def save_pretrained(self, folder):
        if not self.source.is_dir():
            return
        for name in PROCESSOR_FILES:
            if (self.source / name).is_file():
                shutil.copy2(self.source / name, Path(folder) / name)


# How a model card names the language model a MoIIE was upcycled from.
DECODER_NAMES = {"phi3": "Phi-3", "llama": "Llama"}


def how_built(
    llm,
    vision,
    projector,
    is_llava,
    config: MoIIEConfig,
    seed: int,
    token_note: str | None = None,
    dtype: str | None = None,
) -> str:
    decoder = DECODER_NAMES.get(config.text_config.model_type, config.text_config.model_type)
    if is_llava:
        source = f"the dense LLaVA-style model `{llm}` (its SigLIP tower, projector and {decoder} decoder)"
    else:
        source = f"the dense {decoder} `{llm}` and the SigLIP vision tower of `{vision}`"
    if is_llava or projector is not None:
        proj = f"the mlp2x_gelu projector from `{projector or llm}`"
    else:
        proj = (
            f"a **random-initialised** mlp2x_gelu projector (seed {seed}): train it first (stage 1) before the "
            "model is useful"
        )
    lines = [
        f"**Sparse upcycling** of {source}, with {proj}. Every expert of every MoE layer is a copy of that layer's "
        f"dense {decoder} MLP and the routers start N(0, 0.02) (seed {seed}), so the model computes the dense LVLM's "
        "function until its routers are trained.",
        "",
        f"- variant: `{config.variant}`",
        f"- experts per MoE layer: {config.num_vision_experts} vision, {config.num_shared_experts} shared, "
        f"{config.num_language_experts} language; top-{config.num_experts_per_tok}",
        f"- MoE decoder layers: {config.moe_layers}",
        f"- image_token_id: {config.image_token_id}; vision feature layer {config.vision_feature_layer}",
        *([f"- {token_note}"] if token_note else []),
        "",
        "```bash",
        upcycle_command_line(llm, vision, projector, config, seed, dtype),
        "```",
    ]
    return "\n".join(lines)


def upcycle_command_line(llm, vision, projector, config: MoIIEConfig, seed: int, dtype: str | None = None) -> str:
    """The `hf-moe upcycle-moiie` command that rebuilds the MoIIE, for its card."""
    options = {
        "base": llm,
        "vision": vision,
        "num_vision_experts": config.num_vision_experts,
        "num_shared_experts": config.num_shared_experts,
        "num_language_experts": config.num_language_experts,
        "top_k": config.num_experts_per_tok,
        "variant": config.variant,
        "projector": projector,
        "seed": seed,
        "dtype": dtype,
        "output_dir": "DIR",
    }
    return command_line("upcycle-moiie", options=options)

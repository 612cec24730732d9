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

    hf-moe upcycle-moiie --llm microsoft/Phi-3-mini-4k-instruct --vision google/siglip-so400m-patch14-384 \
        --num_vision_experts 1 --num_shared_experts 2 --num_language_experts 1 --top_k 2 --output_dir moiie
    hf-moe upcycle-moiie --llm my-dense-llava-phi3 --output_dir moiie      # a LlavaForConditionalGeneration folder
"""

import shutil
from pathlib import Path

import torch
from transformers.utils import logging

from ..fileio import check_output_dir
from ..hub import check_hub_model_id, save_model_folder
from ..loading import load_config, load_pretrained
from ..modeling import (
    MoIIEConfig,
    MoIIEForCausalLM,
    MoIIELlamaForCausalLM,
    MoIIEPhi3ForCausalLM,
    MoIIEProcessor,
    num_image_tokens_of,
)
from ..modeling.processing_moiie import CHAT_TEMPLATES


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
        state.update(load_file(path))
    for path in sorted(folder.glob("*.bin")) if not state else []:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
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


def upcycle_state_dict(config: MoIIEConfig, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense state dict in MoIIE names -> the MoE one: the MLP of each MoE layer copied into every expert."""
    state, experts = {}, config.num_local_experts
    moe = set(config.moe_layers) if config.variant != "dense" else set()
    for key, value in dense.items():
        parts = key.split(".")
        if key.startswith("model.language_model.layers.") and int(parts[3]) in moe and parts[4] == "mlp":
            prefix = ".".join(parts[:5])
            if parts[5] == "up_proj":  # Llama: stacked under its gate_proj
                continue
            if parts[5] == "gate_proj":  # Llama's separate gate / up -> the experts' fused [gate; up]
                value, parts[5] = torch.cat([value, dense[f"{prefix}.up_proj.weight"]]), "gate_up_proj"
            packed = value.unsqueeze(0).expand(experts, *value.shape).clone()
            state[f"{prefix}.experts.{parts[5]}"] = packed  # gate_up_proj / down_proj
        else:
            state[key] = value
    return state


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
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    hub_private_repo: bool | None = None,
) -> MoIIEForCausalLM:
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
        push_to_hub, hub_model_id, hub_token, hub_private_repo: As `TrainingArguments`.
    """
    llm_config = load_config(llm, require_moe=False)
    is_llava = llm_config.model_type == "llava"
    if is_llava:
        if vision is not None:
            raise ValueError(f"'{llm}' is a LLaVA folder with its own vision tower; leave vision unset.")
        vision_config = _vision_config(llm, llm_config.vision_config)
        _check_phi3(llm, llm_config.text_config, key="text_config.model_type")
        text_config = llm_config.text_config
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
        moe_layers=moe_layers,
        num_vision_experts=num_vision_experts,
        num_shared_experts=num_shared_experts,
        num_language_experts=num_language_experts,
        num_experts_per_tok=top_k,
        variant=variant,
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
    )  # validates the MoE fields (top-k vs each router, moe_layers), naming the key
    projector_state = None
    if projector is not None:
        projector_state = read_projector(projector)
        check_projector(projector_state, vision_config.hidden_size, text_config.hidden_size, f"projector '{projector}'")
    inputs = [llm, vision, projector]
    check_output_dir(output_dir, overwrite, inputs=inputs)
    hub_model_id = check_hub_model_id(output_dir, push_to_hub, hub_model_id)

    if is_llava:
        from transformers import LlavaForConditionalGeneration

        dense = load_pretrained(llm, LlavaForConditionalGeneration, config=llm_config).state_dict()
        dtype = dense["lm_head.weight"].dtype
    else:
        from transformers import AutoModel, LlamaForCausalLM, Phi3ForCausalLM

        lm_class = {"phi3": Phi3ForCausalLM, "llama": LlamaForCausalLM}[llm_config.model_type]
        lm = load_pretrained(llm, lm_class, config=llm_config)
        if vocab_size != rows:
            torch.manual_seed(seed)  # mean_resizing samples the new rows around the old rows' mean
            lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_VOCAB_TO)
        tower = load_pretrained(vision, AutoModel)
        tower = tower.vision_model if hasattr(tower, "text_model") else tower  # SiglipModel: its vision tower
        dense = {f"model.language_model.{k}": v for k, v in lm.model.state_dict().items()}
        dense.update({f"lm_head.{k}": v for k, v in lm.lm_head.state_dict().items()})
        dense.update({f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
        dtype = lm.lm_head.weight.dtype
    if projector_state is not None:
        dense.update({f"model.multi_modal_projector.{k}": v for k, v in projector_state.items()})

    torch.manual_seed(seed)
    model_class = {"phi3": MoIIEPhi3ForCausalLM, "llama": MoIIELlamaForCausalLM}[text_config.model_type]
    model = model_class(config)
    missing, unexpected = model.load_state_dict(upcycle_state_dict(config, dense), strict=False)
    allowed = ("router.weight",) + (("multi_modal_projector.",) if not is_llava and projector is None else ())
    wrong = [key for key in missing if not any(a in key for a in allowed)]
    if wrong or unexpected:
        raise RuntimeError(
            f"Upcycled state dict does not fit {model_class.__name__}: missing {wrong}, unexpected {unexpected}"
        )
    model = model.to(dtype).eval()
    model.config.name_or_path = ""

    card = {
        "base_model": [str(x) for x in (llm, vision) if x is not None],
        "how_built": how_built(
            llm, vision, projector, is_llava, config, seed, image_token_note(added_image_token, config, rows)
        ),
        "tags": ["moiie", text_config.model_type, "siglip", "vision-language", "upcycling"],
        "pipeline_tag": "image-text-to-text",
        "usage": usage(hub_model_id or Path(output_dir).name),
        "model_name": hub_model_id or Path(output_dir).name,
    }
    save_model_folder(
        model,
        (None if tokenizer is None else moiie_processor(tokenizer, vision, config)) or _Files(llm),
        output_dir,
        overwrite=overwrite,
        card=card,
        inputs=inputs,
        push_to_hub=push_to_hub,
        hub_model_id=hub_model_id,
        hub_token=hub_token,
        hub_private_repo=hub_private_repo,
    )
    logger.info(f"Saved a {config.num_local_experts}-expert {variant} MoIIE to {output_dir}")
    return model


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


def how_built(llm, vision, projector, is_llava, config: MoIIEConfig, seed: int, token_note: str | None = None) -> str:
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
        command_line(llm, vision, projector, config, seed),
        "```",
    ]
    return "\n".join(lines)


def command_line(llm, vision, projector, config: MoIIEConfig, seed: int) -> str:
    parts = ["hf-moe upcycle-moiie", f"--llm {llm}"]
    parts += [f"--vision {vision}"] if vision is not None else []
    parts += [
        f"--num_vision_experts {config.num_vision_experts}",
        f"--num_shared_experts {config.num_shared_experts}",
        f"--num_language_experts {config.num_language_experts}",
        f"--top_k {config.num_experts_per_tok}",
        f"--variant {config.variant}",
    ]
    parts += [f"--projector {projector}"] if projector is not None else []
    parts += [f"--seed {seed}", "--output_dir DIR"]
    return " ".join(parts)


def usage(model_id: str) -> str:
    return "\n".join(
        [
            "from transformers import AutoModelForCausalLM",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({model_id!r}, trust_remote_code=True).eval()",
        ]
    )

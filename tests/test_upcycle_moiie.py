"""upcycle_moiie and `hf-moe upcycle-moiie`: the upcycled MoIIE computes the dense LLaVA-style model's logits
(Phi-3 + SigLIP + projector parts, or a LLaVA folder), incompatible inputs are refused with nothing written. A
tokenizer without `<image>` (as real Phi-3's) gets it added and the folder a processor the image-text-to-text pipeline
runs."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

from hf_moe.cli import main
from hf_moe.conversion import upcycle_moiie
from hf_moe.conversion.upcycle_moiie import add_image_token, moiie_processor
from hf_moe.modeling import MoIIEConfig

from moiie_dense import IMAGE_TOKEN, TOKENS_PER_IMAGE, VISION, assert_dense_logits, save_dense_parts


TEXT = dict(
    model_type="phi3",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    vocab_size=100,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A random dense LLaVA (SigLIP + Phi-3) saved whole and as its three parts (Phi-3, SigLIP, projector in the
    original LLaVA's mm_projector names)."""
    root = tmp_path_factory.mktemp("moiie_parts")
    llava = save_dense_parts(root, TEXT, Phi3ForCausalLM, "phi3")
    (root / "phi3" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (root / "projector").mkdir()
    save_file(
        {
            f"model.mm_projector.{i}.{k}": v
            for name, i in (("linear_1", 0), ("linear_2", 2))
            for k, v in getattr(llava.model.multi_modal_projector, name).state_dict().items()
        },
        root / "projector" / "mm_projector.safetensors",
    )
    return root, llava


def assert_same_logits(folder, llava, image_token_id=IMAGE_TOKEN):
    """The folder's model, loaded with remote code, after checking it gives the dense LLaVA's logits over the whole
    vocabulary (a Phi-3 upcycling adds no embedding row here)."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.config.text_config.vocab_size == llava.config.text_config.vocab_size
    assert_dense_logits(model, llava, image_token_id)
    return model


@pytest.mark.parametrize("variant", ["moiie", "vanilla", "modality"])
def test_parts_upcycle_to_the_dense_function(parts, tmp_path, variant):
    root, llava = parts
    out = tmp_path / "out"
    upcycle_moiie(
        root / "phi3",
        root / "siglip",
        out,
        variant=variant,
        projector=root / "projector",
        image_token_id=IMAGE_TOKEN,
        num_vision_experts=1,
        num_shared_experts=2,
        num_language_experts=1,
    )
    model = assert_same_logits(out, llava)
    assert model.config.variant == variant and model.config.moe_layers == [1, 3]
    experts = model.model.language_model.layers[1].mlp.experts.gate_up_proj
    assert experts.shape[0] == 4 and torch.equal(experts[0], experts[3])
    assert (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert str(root / "phi3") in card and str(root / "siglip") in card
    assert f"`{variant}`" in card and "1 vision, 2 shared, 1 language; top-2" in card
    assert "random-initialised" not in card and "image-text-to-text" in card


def test_llava_folder_upcycles_and_random_projector_is_said(parts, tmp_path):
    root, llava = parts
    upcycle_moiie(root / "llava", None, tmp_path / "from_llava")
    model = assert_same_logits(tmp_path / "from_llava", llava)
    assert model.config.image_token_id == IMAGE_TOKEN
    upcycle_moiie(root / "phi3", root / "siglip", tmp_path / "random", image_token_id=IMAGE_TOKEN)
    assert "random-initialised" in (tmp_path / "random" / "README.md").read_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(llm="siglip", vision="siglip"), "'siglip_vision_model'"),
        (dict(llm="phi3", vision="phi3"), "'phi3'"),
        (dict(llm="phi3", vision="siglip", top_k=4), "num_experts_per_tok"),
        (dict(llm="phi3", vision="siglip", image_token_id=100), "image_token_id=100"),
        (dict(llm="llava", vision="siglip"), "leave vision unset"),
        (dict(llm="phi3", vision="siglip", projector="bad_projector"), "linear_1.weight has shape"),
    ],
)
def test_refusals_write_nothing(parts, tmp_path, kwargs, message):
    root, _ = parts
    bad = tmp_path / "bad_projector"
    bad.mkdir()
    save_file(
        {
            "linear_1.weight": torch.zeros(32, 8),
            "linear_1.bias": torch.zeros(32),
            "linear_2.weight": torch.zeros(32, 32),
            "linear_2.bias": torch.zeros(32),
        },
        bad / "p.safetensors",
    )
    for key in ("llm", "vision"):
        kwargs[key] = root / kwargs[key]
    kwargs.setdefault("image_token_id", IMAGE_TOKEN)
    if "projector" in kwargs:
        kwargs["projector"] = bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        upcycle_moiie(output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_command_line(parts, tmp_path, capsys):
    root, llava = parts
    out = tmp_path / "cli"
    main(
        [
            "upcycle-moiie",
            "--llm",
            str(root / "phi3"),
            "--vision",
            str(root / "siglip"),
            "--num_vision_experts",
            "1",
            "--num_shared_experts",
            "2",
            "--num_language_experts",
            "1",
            "--top_k",
            "2",
            "--variant",
            "vanilla",
            "--projector",
            str(root / "projector"),
            "--image_token_id",
            str(IMAGE_TOKEN),
            "--output_dir",
            str(out),
        ]
    )
    assert "vanilla MoIIE" in capsys.readouterr().out
    assert_same_logits(out, llava)
    assert "hf-moe upcycle-moiie --base" in (out / "README.md").read_text()


# ---- a Phi-3-like tokenizer without <image> ------------------------------------------------------------------------

PHI3_SPECIALS = ["<pad>", "<|end|>", "<s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
PHI3_VOCAB = 90  # < TEXT's 100 embedding rows, as Phi-3-mini's 32011 tokens < its 32064 rows
# Phi-3's own template is text-only: it concatenates message['content'] as a string.
PHI3_TEXT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def phi3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Phi-3's turn tokens at TEXT's pad / eos / bos ids, no `<image>`, and a text-only
    chat template."""
    vocab = PHI3_SPECIALS + "what digit is this ? seven".split()
    vocab += [f"w{i}" for i in range(PHI3_VOCAB - len(vocab))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in PHI3_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = PHI3_TEXT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def phi3_chat(parts, tmp_path_factory):
    """The dense Phi-3 folder with `phi3_tokenizer`."""
    root, _ = parts
    llm = tmp_path_factory.mktemp("phi3_chat") / "phi3"
    shutil.copytree(root / "phi3", llm)
    tokenizer = phi3_tokenizer()
    assert len(tokenizer.encode("<image>", add_special_tokens=False)) > 1 and len(tokenizer) == PHI3_VOCAB
    tokenizer.save_pretrained(llm)
    return llm


def test_tokenizer_without_image_token_gets_it_within_the_embedding_rows(parts, phi3_chat, tmp_path):
    root, llava = parts
    out = tmp_path / "moiie"
    upcycle_moiie(phi3_chat, root / "siglip", out, projector=root / "projector")
    model = assert_same_logits(out, llava, image_token_id=PHI3_VOCAB)  # full vocabulary: no row was added
    assert model.config.image_token_id == PHI3_VOCAB and model.config.text_config.vocab_size == TEXT["vocab_size"]
    card = (out / "README.md").read_text()
    assert f"`<image>` was added to the tokenizer as special token id {PHI3_VOCAB}" in card
    assert "so no row was added" in card

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == "MoIIEProcessor" and processor.image_token_id == PHI3_VOCAB
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Phi-3's text-only template cannot place images: the image-aware Phi-3 one with the same turn tokens replaces it
    assert prompt == "<|user|>\n<image>\nwhat digit is this ?<|end|>\n<|assistant|>\n"
    assert AutoTokenizer.from_pretrained(out).chat_template == processor.chat_template

    Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    inputs = processor(images=[Image.open(tmp_path / "a.png").convert("RGB")], text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == PHI3_VOCAB).sum() == TOKENS_PER_IMAGE == inputs["token_type_ids"].sum()
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    pipe = pipeline("image-text-to-text", model=str(out), trust_remote_code=True)
    image_item = {"type": "image", "image": str(tmp_path / "a.png")}
    chat = [{"role": "user", "content": [image_item, messages[0]["content"][1]]}]
    generated = pipe(text=chat, max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]
    assert generated["role"] == "assistant"
    assert generated["content"].split() == processor.decode(new, skip_special_tokens=True).split()


def test_image_token_id_other_than_the_tokenizers_is_refused(parts, phi3_chat, tmp_path):
    root, _ = parts
    with pytest.raises(ValueError, match=f"image_token_id=95 is not the id of '<image>'.*which is {PHI3_VOCAB}"):
        upcycle_moiie(phi3_chat, root / "siglip", tmp_path / "out", image_token_id=95)
    assert not (tmp_path / "out").exists()


def test_own_chat_template_is_kept_only_when_it_places_images(parts):
    root, _ = parts
    config = MoIIEConfig(vision_config=VISION, text_config=TEXT, image_token_id=PHI3_VOCAB)
    own = (
        "{% for m in messages %}{% for item in m['content'] %}{% if item['type'] == 'image' %}<image>"
        "{% else %}[{{ item['text'] }}]{% endif %}{% endfor %}{% endfor %}"
    )
    for template, kept in ((own, True), (PHI3_TEXT_TEMPLATE, False)):
        tokenizer = phi3_tokenizer()
        tokenizer.chat_template = template
        assert add_image_token(tokenizer) and not add_image_token(tokenizer)  # added once, then found
        processor = moiie_processor(tokenizer, root / "siglip", config)
        assert (processor.chat_template == own) is kept and tokenizer.chat_template == processor.chat_template

"""upcycle_moiie and `hf-moe upcycle-moiie`: the upcycled MoIIE computes the dense LLaVA-style model's logits
(Phi-3 + SigLIP + projector parts, or a LLaVA folder), incompatible inputs are refused with nothing written."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Phi3ForCausalLM,
    SiglipVisionModel,
)

from hf_moe.cli import main
from hf_moe.conversion import upcycle_moiie


IMAGE_TOKEN = 99
TOKENS_PER_IMAGE = 4
VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
)
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
    """A random dense LLaVA (SigLIP + Phi-3) saved whole and as its three parts (Phi-3, SigLIP, projector)."""
    root = tmp_path_factory.mktemp("moiie_parts")
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=VISION,
        text_config=TEXT,
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(root / "llava")
    phi3 = Phi3ForCausalLM(llava.config.text_config)
    phi3.model.load_state_dict(llava.model.language_model.state_dict())
    phi3.lm_head.load_state_dict(llava.lm_head.state_dict())
    phi3.save_pretrained(root / "phi3")
    (root / "phi3" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    siglip = SiglipVisionModel(llava.config.vision_config)
    siglip.load_state_dict(llava.model.vision_tower.state_dict())
    siglip.save_pretrained(root / "siglip")
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


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 90, (2, 14), generator=generator)
    input_ids[0, 1 : 1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    input_ids[1, 1 : 1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    input_ids[1, 6 : 6 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, -3:], attention_mask[0, -3:] = 0, 0
    pixel_values = torch.randn(3, 3, 16, 16, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def assert_same_logits(folder, llava):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = batch()
    with torch.no_grad():
        expected = llava(**inputs).logits
        got = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
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
    assert "hf-moe upcycle-moiie --llm" in (out / "README.md").read_text()

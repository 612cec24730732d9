"""MoIIE over a Llama decoder: upcycled from a dense Llama + SigLIP (+ projector) or a dense LLaVA folder it
computes the dense LLaVA-style logits; routing keeps the modalities apart; cached generate() equals uncached
greedy decoding; saved folders load through AutoModelForCausalLM as MoIIELlamaForCausalLM."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionModel,
)

from hf_moe.conversion import upcycle_moiie
from hf_moe.modeling import MoIIEConfig, MoIIELlamaForCausalLM, MoIIEPhi3ForCausalLM
from hf_moe.modeling.modeling_moiie import MoIIEExperts

from conftest import experts_implementations


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
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moiie_llama")
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
    llama = LlamaForCausalLM(llava.config.text_config)
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    llama.save_pretrained(root / "llama")
    siglip = SiglipVisionModel(llava.config.vision_config)
    siglip.load_state_dict(llava.model.vision_tower.state_dict())
    siglip.save_pretrained(root / "siglip")
    (root / "projector").mkdir()
    save_file(
        {f"{k}": v.contiguous() for k, v in llava.model.multi_modal_projector.state_dict().items()},
        root / "projector" / "projector.safetensors",
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


def check_same_logits(model, llava):
    inputs = batch()
    with torch.no_grad():
        expected = llava(**inputs).logits
        got = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["moiie", "vanilla", "modality"])
@pytest.mark.parametrize("implementation", experts_implementations())
def test_upcycled_llama_is_the_dense_function(parts, tmp_path, variant, implementation):
    root, llava = parts
    upcycle_moiie(
        root / "llama",
        root / "siglip",
        tmp_path / "moiie",
        projector=root / "projector",
        image_token_id=IMAGE_TOKEN,
        variant=variant,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moiie", trust_remote_code=True).eval()
    assert type(model).__name__ == "MoIIELlamaForCausalLM"
    model.set_experts_implementation(implementation)
    check_same_logits(model, llava)


def test_llava_llama_folder_upcycles_and_loads_in_process(parts, tmp_path):
    root, llava = parts
    upcycle_moiie(root / "llava", None, tmp_path / "moiie")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moiie").eval()
    assert type(model) is MoIIELlamaForCausalLM
    assert model.config.auto_map["AutoModelForCausalLM"] == "modeling_moiie.MoIIELlamaForCausalLM"
    card = (tmp_path / "moiie" / "README.md").read_text()
    assert "Llama decoder" in card and "Phi-3" not in card
    check_same_logits(model, llava)
    assert type(AutoModelForCausalLM.from_config(model.config)) is MoIIELlamaForCausalLM


def tiny_model(**kwargs):
    torch.manual_seed(0)
    config = MoIIEConfig(
        vision_config=VISION,
        text_config=TEXT,
        image_token_id=IMAGE_TOKEN,
        num_vision_experts=2,
        num_shared_experts=1,
        num_language_experts=2,
        **kwargs,
    )
    return MoIIELlamaForCausalLM(config).eval()


def test_routing_keeps_modalities_apart():
    model = tiny_model(num_experts_per_tok=2)
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
        for m in model.modules()
        if isinstance(m, MoIIEExperts)
    ]
    inputs = batch()
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 2
    is_vision = (inputs["input_ids"] == IMAGE_TOKEN).reshape(-1)
    for top_k_index in seen:
        assert (top_k_index[is_vision] < 3).all()  # vision + shared: experts 0..2
        assert (top_k_index[~is_vision] >= 2).all()  # shared + language: experts 2..4


def test_generate_with_images_is_uncached_greedy():
    model = tiny_model()
    inputs = batch()
    inputs = {k: v[1:] for k, v in inputs.items()}  # the sample with two images (the pixels' last two)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
        ids = inputs["input_ids"]
        for _ in range(5):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(out, ids)


def test_wrong_decoder_is_refused():
    config = tiny_model().config
    with pytest.raises(ValueError, match="needs a 'phi3' text_config"):
        MoIIEPhi3ForCausalLM(config)

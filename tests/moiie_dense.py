"""A tiny dense LLaVA-style model (SigLIP + Phi-3 or Llama + projector) and the check that an upcycled MoIIE
computes its function, shared by the Phi-3 and Llama upcycling tests."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionModel


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


def save_dense_parts(root, text_config: dict, llm_class, llm_name: str) -> LlavaForConditionalGeneration:
    """A random dense LLaVA (SigLIP + `llm_class` decoder) saved whole (`root/llava`) and its decoder (`root/NAME`)
    and vision tower (`root/siglip`) saved apart; returned in eval mode. The projector is the caller's to save, in
    the layout it tests."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=VISION,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(root / "llava")
    llm = llm_class(llava.config.text_config)
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    llm.save_pretrained(root / llm_name)
    siglip = SiglipVisionModel(llava.config.vision_config)
    siglip.load_state_dict(llava.model.vision_tower.state_dict())
    siglip.save_pretrained(root / "siglip")
    return llava


def batch():
    """Two rows: one image and 3 padding tokens, two images; token ids below 90, 14 tokens each."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 90, (2, 14), generator=generator)
    input_ids[0, 1 : 1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    input_ids[1, 1 : 1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    input_ids[1, 6 : 6 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, -3:], attention_mask[0, -3:] = 0, 0
    pixel_values = torch.randn(3, 3, 16, 16, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def assert_dense_logits(model, llava, image_token_id: int = IMAGE_TOKEN) -> None:
    """`model` gives the dense LLaVA's logits (<= 1e-5), its placeholders written as the model's `image_token_id`;
    over the dense vocabulary only, since rows a resize adds only add logits for the new ids."""
    inputs = batch()
    with torch.no_grad():
        expected = llava(**inputs).logits
        ids = inputs["input_ids"]
        got = model(**{**inputs, "input_ids": ids.masked_fill(ids == IMAGE_TOKEN, image_token_id)}).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask][:, : expected.shape[-1]], expected[mask], atol=1e-5, rtol=0)

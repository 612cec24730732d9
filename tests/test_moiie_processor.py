"""MoIIEProcessor: image-placeholder expansion with token_type_ids, several images per sample, text-only input,
the placeholder/image mismatch error, save/reload through AutoProcessor, generate() on its output, and the
image-text-to-text pipeline in-process and in a fresh process without hf_moe."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, PreTrainedTokenizerFast, pipeline
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM, MoIIEProcessor, num_image_tokens_of

from helpers import run_without_hf_moe


SPECIALS = ["<pad>", "<|endoftext|>", "<s>", "<unk>"]
WORDS = "a photo of the cat dog what is in image ? . two".split()
TOKENS_PER_IMAGE = 4  # 16 x 16 pixels in 8 x 8 patches


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer, built offline, with Phi-3 chat tokens and `<image>` as special tokens."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = ["<|user|>", "<|assistant|>", "<|end|>", "<image>"]
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIALS + extra])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )


def toy_processor(**kwargs) -> MoIIEProcessor:
    kwargs = kwargs or {"num_image_tokens": TOKENS_PER_IMAGE}
    return MoIIEProcessor(SiglipImageProcessorPil(size={"height": 16, "width": 16}), toy_tokenizer(), **kwargs)


def toy_model(processor: MoIIEProcessor) -> MoIIEPhi3ForCausalLM:
    tokenizer = processor.tokenizer
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = MoIIEConfig(
        vision_config={**vision, "image_size": 16, "patch_size": 8},
        text_config={**text, "bos_token_id": tokenizer.bos_token_id},
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(0)
    return MoIIEPhi3ForCausalLM(config).eval()


def image(seed: int = 0, size=(20, 24)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random MoIIE model saved with its processor in one folder."""
    folder = tmp_path_factory.mktemp("moiie")
    processor = toy_processor()
    toy_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_placeholders_expand_to_the_image_tokens_with_token_type_ids():
    processor = toy_processor()
    images = [image(0), image(1, (30, 10)), image(2)]  # two images in the first sample, one in the second
    text = ["<image> a cat <image>", "what is <image> ?"]
    out = processor(images=images, text=text, return_tensors="pt", padding=True)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    assert out["pixel_values"].shape == (3, 3, 16, 16)
    is_image = out["input_ids"] == processor.image_token_id
    assert is_image.sum(1).tolist() == [2 * TOKENS_PER_IMAGE, TOKENS_PER_IMAGE]
    assert torch.equal(out["token_type_ids"], is_image.long())
    first = out["input_ids"][0].tolist()
    assert first[:TOKENS_PER_IMAGE] == [processor.image_token_id] * TOKENS_PER_IMAGE
    assert processor.tokenizer.decode(first[TOKENS_PER_IMAGE : TOKENS_PER_IMAGE + 2]) == "a cat"


def test_token_count_from_the_vision_config_or_the_patch_size():
    config = toy_model(toy_processor()).config
    assert num_image_tokens_of(config.vision_config) == TOKENS_PER_IMAGE
    processor = toy_processor(patch_size=config.vision_config.patch_size)
    out = processor(images=[image()], text="<image> a cat")
    assert sum(out["token_type_ids"][0]) == TOKENS_PER_IMAGE


def test_text_only_input():
    out = toy_processor()(text=["a cat", "what is the dog ?"], return_tensors="pt", padding=True)
    assert "pixel_values" not in out
    assert out["token_type_ids"].shape == out["input_ids"].shape and not out["token_type_ids"].any()


@pytest.mark.parametrize("images,text", [([image(), image(1)], "<image> a cat"), (None, "<image> a cat")])
def test_placeholder_image_mismatch_raises(images, text):
    with pytest.raises(ValueError, match="image"):
        toy_processor()(images=images, text=[text])


def test_save_and_reload_through_auto_processor(saved):
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    assert type(processor).__name__ == "MoIIEProcessor" and (saved / "processing_moiie.py").exists()
    assert processor.num_image_tokens == TOKENS_PER_IMAGE and processor.image_token_id == toy_processor().image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>\n<image>\nwhat is in the image ?<|end|>\n<|assistant|>\n"
    out, expected = (p(images=[image()], text=prompt) for p in (processor, toy_processor()))
    assert out["input_ids"] == expected["input_ids"] and np.allclose(out["pixel_values"], expected["pixel_values"])


def test_processor_output_runs_through_the_model_and_generate():
    processor = toy_processor()
    model = toy_model(processor)
    inputs = processor(
        images=[image(0), image(1), image(2)],
        text=["<image> <image> what is in the image ?", "a photo of <image> ."],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and out.vision_aux_loss is not None
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    text_only = processor(text=["a cat"], return_tensors="pt")
    assert model.generate(**text_only, max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_image_text_to_text_pipeline(saved):
    pipe = pipeline("image-text-to-text", model=str(saved), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "a cat ?"}]}]
    result = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"][-1]["role"] == "assistant"
    result = pipe(images=image(), text="<image> what is in the image ?", max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"].startswith("<image> what is in the image ?")


def test_fresh_process_loads_processor_and_pipeline_without_hf_moe(saved, tmp_path):
    script = """
        import sys
        import numpy as np
        from PIL import Image
        from transformers import AutoProcessor, pipeline

        folder = sys.argv[1]
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__name__ == "MoIIEProcessor", type(processor)
        img = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
        out = processor(images=[img], text="<image> a cat", return_tensors="pt")
        assert int(out["token_type_ids"].sum()) == 4, out
        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        result = pipe(images=img, text="<image> a cat", max_new_tokens=2, do_sample=False)
        assert result[0]["generated_text"].startswith("<image> a cat"), result
    """
    run_without_hf_moe(script, [saved], tmp_path)

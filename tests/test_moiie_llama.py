"""MoIIE over a Llama decoder: upcycled from a dense Llama + SigLIP (+ projector) or a dense LLaVA folder it
computes the dense LLaVA-style logits; routing keeps the modalities apart; cached generate() equals uncached
greedy decoding; saved folders load through AutoModelForCausalLM as MoIIELlamaForCausalLM. A Llama tokenizer
without a chat template gets Llama-3's (whose assistant turns the training collator finds), and the upcycled folder
runs through AutoModelForCausalLM and the image-text-to-text pipeline in a fresh process without hf_moe. A tokenizer
filling every embedding row without `<image>` (as Llama-3's) grows the vocabulary by `<image>`, the old vocabulary's
logits staying the dense model's."""

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
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

from hf_moe.conversion import upcycle_moiie
from hf_moe.modeling import MoIIEConfig, MoIIELlamaForCausalLM, MoIIEPhi3ForCausalLM
from hf_moe.modeling.modeling_moiie import MoIIEExperts
from hf_moe.moiie.data import IGNORE_INDEX, MoIIECollator

from conftest import experts_implementations
from helpers import run_without_hf_moe
from moiie_dense import IMAGE_TOKEN, TOKENS_PER_IMAGE, VISION, assert_dense_logits, batch, save_dense_parts


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
    """A random dense LLaVA (SigLIP + Llama) saved whole and as its parts; the projector in plain names."""
    root = tmp_path_factory.mktemp("moiie_llama")
    llava = save_dense_parts(root, TEXT, LlamaForCausalLM, "llama")
    (root / "projector").mkdir()
    save_file(
        {f"{k}": v.contiguous() for k, v in llava.model.multi_modal_projector.state_dict().items()},
        root / "projector" / "projector.safetensors",
    )
    return root, llava


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
    assert_dense_logits(model, llava)


def test_llava_llama_folder_upcycles_and_loads_in_process(parts, tmp_path):
    root, llava = parts
    upcycle_moiie(root / "llava", None, tmp_path / "moiie")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moiie").eval()
    assert type(model) is MoIIELlamaForCausalLM
    assert model.config.auto_map["AutoModelForCausalLM"] == "modeling_moiie.MoIIELlamaForCausalLM"
    card = (tmp_path / "moiie" / "README.md").read_text()
    assert "Llama decoder" in card and "Phi-3" not in card
    assert_dense_logits(model, llava)
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


# ---- Llama-3 chat template, fresh-process loading -----------------------------------------------------------------

LLAMA3_SPECIALS = ["<pad>", "<|eot_id|>", "<|begin_of_text|>", "<unk>", "<|start_header_id|>", "<|end_header_id|>"]
WORDS = "user assistant what digit is this ? seven no even a cat photo".split()


def llama3_tokenizer(with_image: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Llama-3's header / turn tokens at TEXT's pad / eos / bos ids and `<image>` at
    IMAGE_TOKEN (without it, a word there: then, as Llama-3's, its tokens fill the embedding rows exactly); no chat
    template."""
    specials = LLAMA3_SPECIALS + (["<image>"] if with_image else [])
    vocab = LLAMA3_SPECIALS + WORDS
    vocab += [f"w{i}" for i in range(IMAGE_TOKEN - len(vocab))] + (["<image>"] if with_image else ["last"])
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def chat_folder(parts, tmp_path_factory):
    """A MoIIE upcycled from a dense Llama whose folder holds a tokenizer without a chat template."""
    root, _ = parts
    llm = tmp_path_factory.mktemp("llama_chat") / "llama"
    shutil.copytree(root / "llama", llm)
    tokenizer = llama3_tokenizer()
    assert tokenizer.chat_template is None and tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    tokenizer.save_pretrained(llm)
    out = llm.parent / "moiie"
    upcycle_moiie(llm, root / "siglip", out, projector=root / "projector", image_token_id=IMAGE_TOKEN)
    return out


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8))


def test_llama_moiie_gets_a_llama3_chat_template(chat_folder):
    processor = AutoProcessor.from_pretrained(chat_folder, trust_remote_code=True)
    assert type(processor).__name__ == "MoIIEProcessor" and processor.image_token_id == IMAGE_TOKEN
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]},
        {"role": "assistant", "content": "seven"},
        {"role": "user", "content": "is this even ?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat digit is this ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nseven<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nis this even ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_collator_keeps_exactly_the_llama3_assistant_turns(chat_folder, tmp_path):
    processor = AutoProcessor.from_pretrained(chat_folder, trust_remote_code=True)
    image().save(tmp_path / "seven.png")
    conversations = [
        {"from": "human", "value": "<image>\nwhat digit is this ?"},
        {"from": "gpt", "value": "seven"},
        {"from": "human", "value": "is this even ?"},
        {"from": "gpt", "value": "no"},
    ]
    rows = [
        {"id": "a", "images": [str(tmp_path / "seven.png")], "conversations": conversations},
        {"id": "b", "images": [], "conversations": conversations[2:]},
    ]
    batch = MoIIECollator(processor)(rows)
    assert batch["token_type_ids"].sum(1).tolist() == [TOKENS_PER_IMAGE, 0]
    for row, answers in enumerate(["seven<|eot_id|>no<|eot_id|>", "no<|eot_id|>"]):
        labels = batch["labels"][row]
        kept = labels != IGNORE_INDEX
        assert processor.tokenizer.decode(labels[kept]).replace(" ", "") == answers
        assert torch.equal(batch["input_ids"][row][kept], labels[kept])
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id  # the template's <|begin_of_text|>


def test_fresh_process_runs_the_llama_moiie_and_its_pipeline_without_hf_moe(chat_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(chat_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(chat_folder, trust_remote_code=True)
    image(0).save(tmp_path / "image.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image(0)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "logits.pt")
    pipe = pipeline("image-text-to-text", model=str(chat_folder), trust_remote_code=True)
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(tmp_path / "image.png")}, messages[0]["content"][1]],
        }
    ]
    generated = pipe(text=chat, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]
    assert generated["role"] == "assistant"
    (tmp_path / "expected.json").write_text(json.dumps({"prompt": prompt, "generated": generated["content"]}))
    script = """
        import json, sys
        from pathlib import Path
        import torch
        from PIL import Image
        from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

        folder, work = sys.argv[1], Path(sys.argv[2])
        expected = json.loads((work / "expected.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "MoIIELlamaForCausalLM", type(model)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        text = [{"type": "text", "text": "what digit is this ?"}]
        messages = [{"role": "user", "content": [{"type": "image"}, *text]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == expected["prompt"], prompt
        image = Image.open(work / "image.png").convert("RGB")
        with torch.no_grad():
            logits = model(**processor(images=[image], text=prompt, return_tensors="pt")).logits
        torch.testing.assert_close(logits, torch.load(work / "logits.pt"), atol=1e-6, rtol=0)
        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        chat = [{"role": "user", "content": [{"type": "image", "image": str(work / "image.png")}, *text]}]
        generated = pipe(text=chat, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]
        assert generated["content"] == expected["generated"], (generated, expected)
    """
    run_without_hf_moe(script, [chat_folder, tmp_path], tmp_path)


def test_full_vocabulary_grows_by_the_image_token(parts, tmp_path):
    root, llava = parts
    llm, out, rows = tmp_path / "llama", tmp_path / "moiie", TEXT["vocab_size"]
    shutil.copytree(root / "llama", llm)
    tokenizer = llama3_tokenizer(with_image=False)
    assert len(tokenizer) == rows and len(tokenizer.encode("<image>", add_special_tokens=False)) > 1
    tokenizer.save_pretrained(llm)
    upcycle_moiie(llm, root / "siglip", out, projector=root / "projector")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.image_token_id == rows and model.config.text_config.vocab_size == 128  # padded to 64s
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 128
    dense = LlamaForCausalLM.from_pretrained(root / "llama").eval()
    new_rows = model.lm_head.weight[rows:]
    mean = dense.lm_head.weight.mean(0).expand_as(new_rows)
    torch.testing.assert_close(new_rows, mean, atol=1e-3, rtol=0)  # mean-initialised
    assert_dense_logits(model, llava, image_token_id=rows)
    text = {k: v for k, v in batch().items() if k != "pixel_values"}
    text["input_ids"] = text["input_ids"].masked_fill(text["input_ids"] == IMAGE_TOKEN, 5)
    with torch.no_grad():
        expected = dense(**text).logits
        got = model(**text).logits
    mask = text["attention_mask"].bool()
    torch.testing.assert_close(got[mask][:, :rows], expected[mask], atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert f"special token id {rows}; the embeddings and lm_head grew from {rows} to 128 rows" in card

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.image_token_id == rows
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat digit" in prompt  # Llama-3's image template
    inputs = processor(images=[image(0)], text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == rows).sum() == TOKENS_PER_IMAGE
    with torch.no_grad():
        first = model(**inputs).logits[0, -1].argmax()
        out_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    length = inputs["input_ids"].shape[1]
    assert out_ids.shape == (1, length + 3) and out_ids[0, length] == first

"""Tiny dense MoIIE parts built locally (a SigLIP vision tower, a Phi-3 and a word-level tokenizer with the Phi-3
chat tokens), and digit-question conversations on scikit-learn's digits, for the MoIIE demo, experiment and tests.

The parts are saved with `save_pretrained` like the Hub checkpoints they stand in for
(`google/siglip-so400m-patch14-384`, `microsoft/Phi-3-mini-4k-instruct`), so `upcycle_moiie` and `train-moiie`
take them by path, without a download.
"""

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from ..fileio import atomic_output_dir, atomic_output_file
from ..modeling import MoIIEProcessor
from ..toy_data import DIGIT_NAMES, digit_attributes, digit_images_at


SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<s>", "<unk>"]
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>", "<image>"]

# Question kind -> (question about the pictured digit, its answer given the label).
IMAGE_QUESTIONS: dict[str, tuple[str, Callable[[int], str]]] = {
    "digit": ("what digit is this ?", lambda label: DIGIT_NAMES[label]),
    "even": ("is it even ?", lambda label: "yes" if label % 2 == 0 else "no"),
    "greater": ("is it greater than four ?", lambda label: "yes" if label > 4 else "no"),
}
# Text-only questions about a named digit: what a language model can learn without images.
TEXT_QUESTIONS: dict[str, tuple[str, Callable[[int], str]]] = {
    "even": ("is {name} even ?", IMAGE_QUESTIONS["even"][1]),
    "greater": ("is {name} greater than four ?", IMAGE_QUESTIONS["greater"][1]),
}


def digit_question_words() -> list[str]:
    """Every word of the digit questions and answers (the toy tokenizer's vocabulary)."""
    texts = [question for question, _ in IMAGE_QUESTIONS.values()] + [*DIGIT_NAMES, "yes", "no"]
    texts += [question.format(name="") for question, _ in TEXT_QUESTIONS.values()]
    return sorted({word for text in texts for word in text.split()})


def toy_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one token per word of `words`, whitespace-split) with the Phi-3 chat tokens and
    `<image>` as special tokens: every answer is one token, so a tiny decoder learns it in few steps."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS + CHAT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )


def toy_processor(
    words: Sequence[str] | None = None, image_size: int = 16, patch_size: int = 4, num_image_tokens: int | None = None
) -> MoIIEProcessor:
    """A `MoIIEProcessor` of `toy_tokenizer(words)` (default: `digit_question_words()`) and a SigLIP image processor
    resizing to `image_size`; one token per `patch_size` patch unless `num_image_tokens` is given."""
    tokenizer = toy_tokenizer(digit_question_words() if words is None else words)
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    count = num_image_tokens if num_image_tokens is not None else (image_size // patch_size) ** 2
    return MoIIEProcessor(image_processor, tokenizer, num_image_tokens=count)


def toy_vision_config(
    image_size: int = 16, patch_size: int = 4, hidden_size: int = 32, num_layers: int = 2
) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        image_size=image_size,
        patch_size=patch_size,
    )


def toy_text_config(tokenizer, hidden_size: int = 32, num_layers: int = 4) -> Phi3Config:
    """A Phi-3 config fitting `tokenizer` (vocabulary and special-token ids)."""
    return Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_toy_parts(
    output_dir: str | Path,
    processor: MoIIEProcessor,
    seed: int = 0,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    text_hidden_size: int = 32,
    text_layers: int = 4,
) -> tuple[Path, Path]:
    """Save a randomly initialised `Phi3ForCausalLM` (with `processor`'s files, which `upcycle_moiie` copies) in
    `output_dir/phi3` and a `SiglipVisionModel` fitting `processor`'s images in `output_dir/siglip`."""
    output_dir = Path(output_dir)
    size = processor.image_processor.size["height"]
    patch = size // round(processor.num_image_tokens**0.5)
    torch.manual_seed(seed)
    vision = SiglipVisionModel(toy_vision_config(size, patch, vision_hidden_size, vision_layers)).eval()
    llm = Phi3ForCausalLM(toy_text_config(processor.tokenizer, text_hidden_size, text_layers)).eval()
    with atomic_output_dir(output_dir / "siglip", overwrite=True) as tmp:
        vision.save_pretrained(tmp)
    with atomic_output_dir(output_dir / "phi3", overwrite=True) as tmp:
        llm.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return output_dir / "phi3", output_dir / "siglip"


def save_dense_parts(moiie_dir: str | Path, output_dir: str | Path) -> tuple[Path, Path]:
    """Split a dense-variant MoIIE folder (trained end to end) into the parts `upcycle_moiie` takes, as if they
    had been pretrained separately: `output_dir/phi3` (`Phi3ForCausalLM` + the folder's processor files) and
    `output_dir/siglip` (`SiglipVisionModel`). The projector is left out: stage 1 trains a new one."""
    from transformers import AutoProcessor

    dense = AutoModelForCausalLM.from_pretrained(moiie_dir)
    if dense.config.variant != "dense":
        raise ValueError(f"'{moiie_dir}' is a {dense.config.variant!r} MoIIE; only a 'dense' one splits into parts.")
    output_dir = Path(output_dir)
    # A fresh config: the MoIIE's text sub-config carries the experts-implementation setting Phi-3 refuses.
    llm = Phi3ForCausalLM(Phi3Config.from_dict(dense.config.text_config.to_dict()))
    llm.model.load_state_dict(dense.model.language_model.state_dict())
    llm.lm_head.load_state_dict(dense.lm_head.state_dict())
    vision = SiglipVisionModel(SiglipVisionConfig.from_dict(dense.config.vision_config.to_dict()))
    vision.load_state_dict(dense.model.vision_tower.state_dict())
    with atomic_output_dir(output_dir / "siglip", overwrite=True) as tmp:
        vision.eval().save_pretrained(tmp)
    with atomic_output_dir(output_dir / "phi3", overwrite=True) as tmp:
        llm.eval().save_pretrained(tmp)
        AutoProcessor.from_pretrained(moiie_dir).save_pretrained(tmp)
    return output_dir / "phi3", output_dir / "siglip"


def digit_labels(indices: Iterable[int]) -> list[int]:
    labels = digit_attributes()[0]
    return [int(labels[i]) for i in indices]


def image_conversation(file_name: str, label: int, kind: str) -> dict:
    question, answer = IMAGE_QUESTIONS[kind]
    return {
        "image": file_name,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer(label)},
        ],
    }


def text_conversation(label: int, kind: str) -> dict:
    question, answer = TEXT_QUESTIONS[kind]
    return {
        "conversations": [
            {"from": "human", "value": question.format(name=DIGIT_NAMES[label])},
            {"from": "gpt", "value": answer(label)},
        ]
    }


def save_digit_images(image_folder: str | Path, indices: Iterable[int], size: int = 16) -> list[str]:
    """Write the digits at `indices` (upscaled to `size`) as `digit_<index>_<size>px.png`, unless already there;
    return the file names."""
    image_folder = Path(image_folder)
    image_folder.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    names = [f"digit_{index:04d}_{size}px.png" for index in indices]
    for name, image in zip(names, digit_images_at(indices, size)):
        if not (image_folder / name).is_file():
            image.save(image_folder / name)
    return names


def save_digit_questions(
    json_path: str | Path,
    image_folder: str | Path,
    indices: Iterable[int],
    kinds: Sequence[str],
    size: int = 16,
    text_only_per_kind: int = 0,
    seed: int = 0,
) -> Path:
    """A LLaVA-format JSON of one conversation per digit at `indices` and question kind in `kinds` (images written
    to `image_folder`), plus `text_only_per_kind` text-only questions ("is seven even ?") per `TEXT_QUESTIONS`
    kind, shuffled (seeded)."""
    unknown = sorted(set(kinds) - set(IMAGE_QUESTIONS))
    if unknown:
        raise ValueError(f"Unknown question kinds {unknown}; expected some of {sorted(IMAGE_QUESTIONS)}.")
    indices = list(indices)
    names = save_digit_images(image_folder, indices, size)
    labels = digit_labels(indices)
    samples = [image_conversation(name, label, kind) for name, label in zip(names, labels) for kind in kinds]
    rng = np.random.default_rng(seed)
    for kind in TEXT_QUESTIONS:
        samples += [text_conversation(int(label), kind) for label in rng.integers(10, size=text_only_per_kind)]
    order = rng.permutation(len(samples))
    samples = [{"id": str(i), **samples[j]} for i, j in enumerate(order)]
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_file(json_path) as tmp:
        Path(tmp).write_text(json.dumps(samples))
    return json_path


__all__ = [
    "IMAGE_QUESTIONS",
    "TEXT_QUESTIONS",
    "digit_labels",
    "digit_question_words",
    "save_dense_parts",
    "save_digit_questions",
    "save_toy_parts",
    "toy_processor",
    "toy_text_config",
    "toy_tokenizer",
    "toy_vision_config",
]

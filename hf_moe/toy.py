"""Small dense models built locally, with real tokenizers and processors, for the demo and the tests.

They are saved with `save_pretrained` like any Hub checkpoint, so every code path that takes a Hub id
(converters, training, evaluation, pipelines) is exercised on them by path, without a download.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil


def toy_clip_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte-level symbols (each word spelled out letter by letter),
    plus BPE merges that make each of `words` one token, as a trained BPE vocabulary does for frequent words:
    a small text tower then learns a caption's meaning in far fewer steps than from spelled-out letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    merges = []
    for word in words:
        if not word.isascii() or not word.isalnum():
            raise ValueError(f"Whole-word tokens must be ASCII letters or digits, got {word!r}.")
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                merges.append((merged, piece))
                vocab[merged + piece] = len(vocab)
            merged += piece
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def toy_clip_config(
    hidden_size: int = 32,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 32,
    vocab_size: int | None = None,
) -> CLIPConfig:
    """A CLIP config of the given (small) size whose text tower fits `toy_clip_tokenizer` (`vocab_size`: its
    length; default that of the tokenizer without whole-word tokens)."""
    tokenizer_size = vocab_size or 2 + 2 * len(pre_tokenizers.ByteLevel.alphabet())
    shared = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        projection_dim=projection_dim,
    )
    text = dict(
        shared, vocab_size=tokenizer_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1
    )
    vision = dict(shared, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_toy_clip(output_dir: str | Path, seed: int = 0, words: Sequence[str] = (), **config_kwargs) -> Path:
    """Save a randomly initialised small `CLIPModel` with its processor, as a Hub checkpoint would be laid out
    (`words`: whole-word tokens of its tokenizer, see `toy_clip_tokenizer`)."""
    torch.manual_seed(seed)
    tokenizer = toy_clip_tokenizer(words)
    config = toy_clip_config(vocab_size=len(tokenizer), **config_kwargs)
    model = CLIPModel(config).eval()
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return Path(output_dir)

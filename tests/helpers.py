"""Inputs, tiny models, small reference implementations, a script loader and a fresh-process runner shared by the
tests."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Prepended to scripts run by `run_without_hf_moe`: importing hf_moe fails, as on a Hub user's machine (the demos
# reload their models behind the same lines).
from hf_moe.experiments import BLOCK_HF_MOE


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_without_hf_moe(script: str, args: list[str], workdir) -> None:
    """Run `script` in a fresh interpreter where hf_moe cannot be imported (remote code comes from the folder)."""
    path = workdir / "fresh.py"
    path.write_text(BLOCK_HF_MOE + textwrap.dedent(script))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(path), *map(str, args)], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    # The child's own error is what explains a failure: put it in the assertion message, not only a return code.
    assert result.returncode == 0, (
        f"{path.name} exited with {result.returncode}.\n--- its stderr ---\n{result.stderr[-8000:]}"
        f"\n--- its stdout ---\n{result.stdout[-2000:]}"
    )


def clip_inputs(config, batch_size: int = 3, seq_len: int = 9, seed: int = 0, pad: int = 0):
    """Random pixels and token ids ending in EOS; the last `pad` tokens of the first row are padding."""
    generator = torch.Generator().manual_seed(seed)
    text, vision = config.text_config, config.vision_config
    pixel_values = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
    input_ids = torch.randint(2, text.vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, -1] = text.eos_token_id
    attention_mask = torch.ones_like(input_ids)
    if pad:
        input_ids[0, seq_len - pad - 1] = text.eos_token_id
        input_ids[0, seq_len - pad :] = text.pad_token_id
        attention_mask[0, seq_len - pad :] = 0
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


# The tiny BERT's whole-word vocabulary: the captions' words of test_mode_embed and the prompts' of test_mode_model.
TINY_BERT_WORDS = (
    "this is photo of cat dog car bird ship red blue the green small large tree on in grass road sky".split()
)


def save_tiny_bert(folder, seed: int = 0, hidden_size: int = 16):
    """A random 2-layer BertModel and its WordPiece tokenizer over special tokens, ".", letters and
    `TINY_BERT_WORDS`, saved like a Hub checkpoint. Its large random weights (initializer_range 0.5, against BERT's
    0.02) give different captions different embeddings: at 0.02 every caption gets nearly the same one (cosine ~1)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [word for word in TINY_BERT_WORDS if word not in vocab]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # The vocabulary goes in positionally: transformers 5's BertTokenizer takes it as `vocab` and ignores a
    # `vocab_file=` keyword, which leaves only the special tokens, so that every word becomes [UNK].
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


def save_vision_finetunes(base, root, seeds=(1, 2), scale: float = 0.05) -> list[Path]:
    """Stand-ins for fine-tunes of the CLIP at `base`: its vision tower moved by small random task vectors (one per
    seed), saved as `root/ft<seed>`."""
    from transformers import CLIPModel

    folders = []
    for seed in seeds:
        model = CLIPModel.from_pretrained(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.vision_model.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(Path(root) / f"ft{seed}")
        folders.append(Path(root) / f"ft{seed}")
    return folders


def load_script(path, name: str | None = None):
    """Import an example or benchmark script (`path` relative to the repository root) as a module, without running
    its `__main__` block."""
    path = REPO_ROOT / path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_fixture(path, name: str | None = None):
    """A module-scoped fixture that imports the script at `path` once per test module: `bench = script_fixture(...)`
    makes a fixture named `bench`."""

    @pytest.fixture(scope="module")
    def script():
        return load_script(path, name)

    return script

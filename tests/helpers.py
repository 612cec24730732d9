"""Inputs, small reference implementations and a fresh-process runner shared by the tests."""

import os
import subprocess
import sys
import textwrap

import torch


# Prepended to scripts run by `run_without_hf_moe`: importing hf_moe fails, as on a Hub user's machine.
BLOCK_HF_MOE = """
import importlib.abc, sys

class BlockHfMoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_moe" or name.startswith("hf_moe."):
            raise ImportError("hf_moe is deliberately not importable here")

sys.meta_path.insert(0, BlockHfMoe())
"""


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

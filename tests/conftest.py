import os

import pytest
import torch


# Tests never reach the Hub; remote-code modules go to a throw-away cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_clip_dir(tmp_path_factory):
    """A small dense CLIP with its processor, saved like a Hub checkpoint."""
    from hf_moe.toy import save_toy_clip

    return save_toy_clip(tmp_path_factory.mktemp("toy") / "clip", seed=0)


@pytest.fixture(scope="session")
def upcycled_dir(toy_clip_dir, tmp_path_factory):
    """The toy CLIP sparse-upcycled to 4 experts, top-2."""
    from hf_moe.conversion import upcycle_clip

    output = tmp_path_factory.mktemp("moe") / "clip-moe"
    upcycle_clip(toy_clip_dir, output, num_experts=4, top_k=2, seed=0)
    return output


def experts_implementations() -> list[str]:
    """The experts implementations this torch supports on CPU (grouped_mm needs torch's grouped_mm op)."""
    impls = ["eager", "batched_mm"]
    if hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"):
        impls.append("grouped_mm")
    return impls

"""A tour of hf-moe that runs anywhere, offline, in well under a minute on a laptop CPU:

1. build a small dense CLIP locally (random weights, a real tokenizer and image processor);
2. upcycle it into a 4-expert top-2 CLIP-MoE with the same converter users run on openai/clip-vit-large-patch14;
3. check that the upcycled model computes the dense function (it must, before router training);
4. reload the saved folder with `trust_remote_code=True` in a process where hf_moe is not importable,
   the way a Hub user would;
5. classify real handwritten digits shipped with scikit-learn through `pipeline("zero-shot-image-classification")`.

    hf-moe demo [--output_dir outputs/demo]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .conversion import upcycle_clip
from .toy import save_toy_clip


def digit_images(count: int = 10) -> tuple[list[Image.Image], list[int]]:
    """The first `count` of scikit-learn's bundled 8x8 handwritten digits, as RGB images with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).convert("RGB").resize((32, 32))
        for i in range(count)
    ]
    return images, [int(label) for label in digits.target[:count]]


# Runs in a fresh interpreter in which importing hf_moe fails: the model must load from the folder's own code.
HUB_USER_SCRIPT = r"""
import importlib.abc, json, sys

class NoHfMoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_moe":
            raise ImportError("hf_moe is not installed for this user")

sys.meta_path.insert(0, NoHfMoe())
import torch
from transformers import AutoModel, CLIPModel, pipeline

moe_dir, dense_dir, *image_paths = sys.argv[1:]
model = AutoModel.from_pretrained(moe_dir, trust_remote_code=True).eval()
dense = CLIPModel.from_pretrained(dense_dir).eval()
pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    moe_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    dense_features = dense.get_image_features(pixel_values=pixel_values).pooler_output
classifier = pipeline("zero-shot-image-classification", model=moe_dir, trust_remote_code=True)
candidates = [f"a photo of the digit {d}" for d in range(10)]
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "parameters": model.num_parameters(),
    "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n),
    "max_abs_difference": (moe_features - dense_features).abs().max().item(),
    "predictions": [int(classifier(path, candidate_labels=candidates)[0]["label"][-1]) for path in image_paths],
}))
"""


def run(output_dir: Path) -> dict:
    output_dir = Path(output_dir)
    dense_dir, moe_dir = output_dir / "dense-clip", output_dir / "clip-moe"
    print(f"1. Building a small dense CLIP in {dense_dir}")
    save_toy_clip(dense_dir)

    print(f"2. Upcycling it into a 4-expert, top-2 CLIP-MoE in {moe_dir}")
    upcycle_clip(dense_dir, moe_dir, num_experts=4, top_k=2, overwrite=True)

    print("3. In a fresh Python process where hf_moe cannot be imported (as for a Hub user):")
    print("   AutoModel.from_pretrained(folder, trust_remote_code=True) and")
    print("   pipeline('zero-shot-image-classification') on scikit-learn's handwritten digits")
    images, labels = digit_images()
    (output_dir / "digits").mkdir(exist_ok=True)
    image_paths = [str(output_dir / "digits" / f"{i}.png") for i in range(len(images))]
    for image, path in zip(images, image_paths):
        image.save(path)
    child = subprocess.run(
        [sys.executable, "-c", HUB_USER_SCRIPT, str(moe_dir), str(dense_dir), *image_paths],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"Loading {moe_dir} without hf_moe failed:\n{child.stderr}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    correct = sum(p == label for p, label in zip(result["predictions"], labels))
    print(
        f"   loaded {result['class']}: {result['parameters']:,} parameters ({result['expert_parameters']:,} in experts)"
    )
    print(
        f"   max |MoE - dense| image feature = {result['max_abs_difference']:.2e} (upcycling keeps the dense function)"
    )
    print(f"   true:      {' '.join(map(str, labels))}")
    print(f"   predicted: {' '.join(map(str, result['predictions']))}   ({correct}/{len(labels)} right: the toy model")
    print("   is untrained, so this shows the plumbing, not accuracy)")
    print(f"Done. The CLIP-MoE folder is {moe_dir.resolve()}")
    return {**result, "labels": labels, "model_dir": moe_dir}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hf-moe demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output_dir", "--output-dir", default="outputs/demo", help="Where the demo writes its models."
    )
    args = parser.parse_args(argv)
    run(Path(args.output_dir))


if __name__ == "__main__":
    main()

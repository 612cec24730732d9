"""A tour of hf-moe that runs anywhere, offline, in about a minute on a laptop CPU:

1. build a small dense CLIP locally (random weights, a real tokenizer and image processor);
2. sparse-upcycle it into a 4-expert top-2 CLIP-MoE with the converter users run on openai/clip-vit-large-patch14,
   and check that it computes the dense function (it must, before router training);
3. CLIP-MoE's own recipe on built-in data (scikit-learn's handwritten digits with generated captions):
   two MCL stages -> three diverse experts -> a 3-expert CLIP-MoE -> router training;
4. reload the trained folder with `trust_remote_code=True` in a process where hf_moe is not importable,
   the way a Hub user would, and classify digits through `pipeline("zero-shot-image-classification")`.

    hf-moe demo [--output_dir outputs/demo]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import datasets
import torch
from transformers import CLIPModel
from transformers.utils import logging

from ..conversion import upcycle_clip
from ..toy import save_toy_clip
from ..toy_data import digit_images, save_digit_caption_folder
from .mcl import MCLArguments, run_mcl
from .train_router import RouterTrainingArguments, train_router
from .trainer import CLIPMoETrainingArguments


# Runs in a fresh interpreter in which importing hf_moe fails: the model must load from the folder's own code.
HUB_USER_SCRIPT = r"""
import importlib.abc, json, sys

class NoHfMoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_moe":
            raise ImportError("hf_moe is not installed for this user")

sys.meta_path.insert(0, NoHfMoe())
from transformers import AutoModel, pipeline

moe_dir, *image_paths = sys.argv[1:]
model = AutoModel.from_pretrained(moe_dir, trust_remote_code=True).eval()
classifier = pipeline("zero-shot-image-classification", model=moe_dir, trust_remote_code=True)
candidates = [f"a photo of the digit {d}" for d in range(10)]
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "parameters": model.num_parameters(),
    "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n),
    "predictions": [int(classifier(path, candidate_labels=candidates)[0]["label"][-1]) for path in image_paths],
}))
"""


def quiet_training_args(output_dir: Path, **overrides) -> CLIPMoETrainingArguments:
    """A few CPU steps without progress bars or checkpoints: the demo shows the recipe, not a converged model."""
    fields = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    return CLIPMoETrainingArguments(**{**fields, **overrides})


def max_feature_difference(model, dense) -> float:
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe_features = model.get_image_features(pixel_values=pixel_values).pooler_output
        dense_features = dense.get_image_features(pixel_values=pixel_values).pooler_output
    return (moe_features - dense_features).abs().max().item()


def run(output_dir: Path) -> dict:
    output_dir = Path(output_dir)
    dense_dir, upcycled_dir = output_dir / "dense-clip", output_dir / "sparse-upcycled"
    print(f"1. Building a small dense CLIP in {dense_dir}")
    save_toy_clip(dense_dir)

    print(f"2. Sparse upcycling into a 4-expert, top-2 CLIP-MoE in {upcycled_dir}")
    upcycled = upcycle_clip(dense_dir, upcycled_dir, num_experts=4, top_k=2, overwrite=True)
    difference = max_feature_difference(upcycled, CLIPModel.from_pretrained(dense_dir))
    print(f"   max |MoE - dense| image feature = {difference:.2e} (upcycling keeps the dense function)")

    data_dir, mcl_dir, routed_dir = output_dir / "digit-captions", output_dir / "mcl", output_dir / "clip-moe"
    print(f"3. CLIP-MoE recipe on 128 captioned digits ({data_dir})")
    save_digit_caption_folder(data_dir, count=128)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the Trainer's and datasets' own notices would drown the tour
    datasets.disable_progress_bars()
    mcl_args = MCLArguments(base=str(dense_dir), data=str(data_dir), num_experts=3, image_clusters=2, text_clusters=2)
    moe_dir = run_mcl(mcl_args, quiet_training_args(mcl_dir))
    print(f"   MCL: stage0 (the base) + 2 stages trained on cluster-homogeneous batches -> {moe_dir}")
    router_args = RouterTrainingArguments(model=str(moe_dir), data=str(data_dir))
    train_router(
        router_args, quiet_training_args(routed_dir, max_steps=8, learning_rate=0.05, per_device_train_batch_size=16)
    )
    logging.set_verbosity(verbosity)
    datasets.enable_progress_bars()
    print(f"   router training (routers only; CLIP loss + 0.01 x balance loss) -> {routed_dir}")

    print("4. In a fresh Python process where hf_moe cannot be imported (as for a Hub user):")
    print("   AutoModel.from_pretrained(folder, trust_remote_code=True) and")
    print("   pipeline('zero-shot-image-classification') on held-out handwritten digits")
    images, labels = digit_images(10, offset=1000)
    (output_dir / "digits").mkdir(exist_ok=True)
    image_paths = [str(output_dir / "digits" / f"{i}.png") for i in range(len(images))]
    for image, path in zip(images, image_paths):
        image.save(path)
    child = subprocess.run(
        [sys.executable, "-c", HUB_USER_SCRIPT, str(routed_dir), *image_paths], capture_output=True, text=True
    )
    if child.returncode != 0:
        raise RuntimeError(f"Loading {routed_dir} without hf_moe failed:\n{child.stderr}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    correct = sum(p == label for p, label in zip(result["predictions"], labels))
    print(
        f"   loaded {result['class']}: {result['parameters']:,} parameters ({result['expert_parameters']:,} in experts)"
    )
    print(f"   true:      {' '.join(map(str, labels))}")
    print(f"   predicted: {' '.join(map(str, result['predictions']))}   ({correct}/{len(labels)} right after a few")
    print("   CPU steps on 128 images: this shows the pipeline, not accuracy)")
    print(f"Done. The trained CLIP-MoE folder is {routed_dir.resolve()}")
    return {**result, "max_abs_difference": difference, "labels": labels, "model_dir": routed_dir}


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

"""A tour of hf-moe that runs anywhere, offline, in about a minute on a laptop CPU:

1. build a small dense CLIP locally (a real tokenizer and image processor) and train it briefly, contrastively,
   on 1500 of scikit-learn's handwritten digits with generated captions ("a heavy narrow seven"), so that it
   classifies digits zero-shot far above chance;
2. sparse-upcycle it into a 4-expert top-2 CLIP-MoE with the converter users run on openai/clip-vit-large-patch14,
   and check that it computes the dense function (it must, before router training);
3. CLIP-MoE's own recipe on the same captioned digits: two MCL stages -> three diverse experts -> a 3-expert
   top-2 CLIP-MoE -> router training;
4. dense vs CLIP-MoE on the 297 held-out digits: zero-shot accuracy and caption retrieval R@1;
5. reload the trained folder with `trust_remote_code=True` in a process where hf_moe is not importable,
   the way a Hub user would, and classify the held-out digits through `pipeline("zero-shot-image-classification")`:
   it must predict what the in-process model predicts;
6. which experts the trained CLIP-MoE uses for the held-out digits and their captions (`hf-moe analyze-routing`):
   OUTPUT_DIR/routing/routing.md and its figures.

    hf-moe demo [--output_dir outputs/demo]

Everything goes to OUTPUT_DIR, the numbers also to OUTPUT_DIR/demo_result.json. The training here is a few CPU
seconds with learning rates far above the recipe's (its defaults are for ViT-L/14 on a million pairs); every
hyper-parameter is set below, so that the demo's numbers do not move when a default does.
"""

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPModel

from ..conversion import upcycle_clip
from ..data import ImageTextCollator, load_image_text_dataset
from ..evaluation import image_text_retrieval, zero_shot_classification
from ..experiments import quiet_tiny_run, run_as_hub_user
from ..fileio import atomic_output_file
from ..loading import load_config, load_pretrained
from ..modeling import CLIPMoEModel
from ..routing_report import RoutingArguments, write_routing_report
from ..toy import save_toy_clip
from ..toy_data import (
    DIGIT_NAMES,
    NUM_DIGITS,
    described_digit_words,
    digit_classification_dataset,
    digit_images_at,
    digit_retrieval_dataset,
    save_described_digit_folder,
)
from .mcl import MCLArguments, run_mcl
from .routing import analyze_routing
from .train_router import RouterTrainingArguments, train_router
from .trainer import CLIPMoERouterTrainingArguments, CLIPMoETrainer, CLIPMoETrainingArguments, MCLTrainingArguments


TRAIN_DIGITS = range(0, 1500)
HELD_OUT_DIGITS = range(1500, NUM_DIGITS)
# The class prompt is one of the caption templates the model is trained on (CLIP's prompts, likewise, resemble
# its web captions); the held-out images are what makes the evaluation a test.
PROMPT = "a handwritten digit {}"
RESULT_FILE = "demo_result.json"
# What the demo writes in OUTPUT_DIR; a re-run removes these (and only these) first, so that it starts afresh
# instead of being refused by the training jobs recorded there by the previous run.
DEMO_OUTPUTS = (
    "dense-init",
    "dense-clip",
    "sparse-upcycled",
    "digit-captions",
    "mcl",
    "clip-moe",
    "held-out",
    "held-out-captions",
    "routing",
)

# Runs after experiments.BLOCK_HF_MOE, in a fresh interpreter in which importing hf_moe fails: the model must load
# from the folder's own code.
HUB_USER_SCRIPT = r"""
import json, sys
from transformers import AutoModel, pipeline

moe_dir, prompt, names, *image_paths = sys.argv[1:]
names = names.split(",")
model = AutoModel.from_pretrained(moe_dir, trust_remote_code=True).eval()
classifier = pipeline("zero-shot-image-classification", model=moe_dir, trust_remote_code=True)
outputs = classifier(image_paths, candidate_labels=names, hypothesis_template=prompt, batch_size=64)
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "parameters": model.num_parameters(),
    "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n),
    "predictions": [names.index(output[0]["label"]) for output in outputs],
}))
"""


def digit_training_args(args_class=CLIPMoETrainingArguments, **fields) -> CLIPMoETrainingArguments:
    """CPU training arguments with every result-changing hyper-parameter set (the library's defaults are the
    official ViT-L/14 recipe and may change); no checkpoints, logs or progress bars unless asked for."""
    settings = dict(
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        label_smoothing=0.1,
        logit_scale=100.0,
        balance_loss_weights="paper",
        seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        log_expert_load="none",
        dataloader_num_workers=0,
    )
    settings.update(fields)
    settings.setdefault("warmup_steps", max(1, settings["max_steps"] // 10))
    return args_class(**settings)


def train_contrastive(
    model_dir: Path, data_dir: Path, output_dir: Path, trainable_parameters: list[str], **fields
) -> Path:
    """Train the `trainable_parameters` of the CLIP or CLIP-MoE in `model_dir` with the recipe's loss (contrastive,
    fixed logit scale, label smoothing; + balance losses for an MoE) on `data_dir`; save it with its processor in
    `output_dir`. `fields` are `digit_training_args` fields."""
    args = digit_training_args(output_dir=str(output_dir), trainable_parameters=trainable_parameters, **fields)
    processor = AutoProcessor.from_pretrained(model_dir)
    # Experts train with dropout 0.1, as in router training; a dense CLIP has no such field.
    is_moe = hasattr(load_config(model_dir), "num_local_experts")
    model = load_pretrained(model_dir, **({"expert_dropout": 0.1} if is_moe else {}))
    trainer = CLIPMoETrainer(
        model=model,
        args=args,
        train_dataset=load_image_text_dataset(data_dir),
        data_collator=ImageTextCollator(processor),
    )
    trainer.train()
    trainer.save_model()
    processor.save_pretrained(output_dir)
    return output_dir


def run_digit_mcl(base_dir: Path, data_dir: Path, output_dir: Path, mcl: dict, **fields) -> Path:
    """MCL stages (MLPs only, cluster-homogeneous batches) and the CLIP-MoE built from them; returns `DIR/moe`."""
    mcl_args = MCLArguments(
        base=str(base_dir), data=str(data_dir), long_text=False, feature_batch_size=256, feature_shard_size=8192, **mcl
    )
    training_args = digit_training_args(MCLTrainingArguments, output_dir=str(output_dir), **fields)
    return run_mcl(mcl_args, training_args)


def train_digit_router(moe_dir: Path, data_dir: Path, output_dir: Path, expert_dropout: float = 0.1, **fields) -> Path:
    router_args = RouterTrainingArguments(model=str(moe_dir), data=str(data_dir), expert_dropout=expert_dropout)
    training_args = digit_training_args(
        CLIPMoERouterTrainingArguments, output_dir=str(output_dir), trainable_parameters=[r"\.router\."], **fields
    )
    return train_router(router_args, training_args)


class DigitEvaluation:
    """Zero-shot accuracy (prompt `PROMPT`) and caption retrieval R@1 on held-out digits.

    Retrieval uses one image per distinct (digit, ink, width) caption, so every query has exactly one right answer.
    """

    def __init__(self, indices=HELD_OUT_DIGITS):
        self.classification = digit_classification_dataset(indices)
        self.retrieval = digit_retrieval_dataset(indices)

    def __call__(self, model, processor) -> dict:
        zero_shot = zero_shot_classification(
            model, processor, self.classification, templates=[PROMPT], return_predictions=True, progress=False
        )
        retrieval = image_text_retrieval(model, processor, self.retrieval, k_values=(1,), progress=False)
        return {
            "zero_shot_accuracy": zero_shot["top1_accuracy"],
            "image_to_text_R@1": retrieval["image_to_text_R@1"],
            "text_to_image_R@1": retrieval["text_to_image_R@1"],
            "predictions": zero_shot["predictions"],
        }


def max_feature_difference(model, dense) -> float:
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe_features = model.get_image_features(pixel_values=pixel_values).pooler_output
        dense_features = dense.get_image_features(pixel_values=pixel_values).pooler_output
    return (moe_features - dense_features).abs().max().item()


def reload_without_hf_moe(model_dir: Path, image_paths: list[str]) -> dict:
    args = [model_dir, PROMPT, ",".join(DIGIT_NAMES), *image_paths]
    return run_as_hub_user(HUB_USER_SCRIPT, args, model_dir)


def write_demo_routing(moe_dir: Path, output_dir: Path, seed: int = 0) -> Path:
    """`hf-moe analyze-routing` on the held-out digits with their captions (both towers, per digit class): writes
    OUTPUT_DIR/routing (routing.md, routing.json, the figures)."""
    data_dir = save_described_digit_folder(output_dir / "held-out-captions", HELD_OUT_DIGITS, seed=seed)
    routing_dir = output_dir / "routing"
    args = RoutingArguments(
        model=str(moe_dir), data=str(data_dir), output_dir=str(routing_dir), batch_size=64, device="cpu"
    )
    write_routing_report(analyze_routing(args, progress=False), routing_dir, overwrite=True)
    return routing_dir


def _scores(result: dict) -> str:
    return (
        f"zero-shot {result['zero_shot_accuracy']:.3f}, R@1 image->text {result['image_to_text_R@1']:.3f}, "
        f"text->image {result['text_to_image_R@1']:.3f}"
    )


def run(output_dir: Path, pretrain_steps: int = 600, seed: int = 0) -> dict:
    started = time.perf_counter()
    output_dir = Path(output_dir)
    for name in DEMO_OUTPUTS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    with quiet_tiny_run():
        result = _run(output_dir, pretrain_steps, seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_output_file(output_dir / RESULT_FILE) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Done in {result['seconds']:.0f} s. The trained CLIP-MoE folder is {(output_dir / 'clip-moe').resolve()}")
    return result


def _run(output_dir: Path, pretrain_steps: int, seed: int) -> dict:
    init_dir, dense_dir, data_dir = output_dir / "dense-init", output_dir / "dense-clip", output_dir / "digit-captions"
    evaluate = DigitEvaluation()
    chance = 1 / len(DIGIT_NAMES)
    num_captions = len(evaluate.retrieval)

    print(f"1. A small dense CLIP ({init_dir}), trained contrastively on {len(TRAIN_DIGITS)} captioned digits")
    save_toy_clip(init_dir, seed=seed, words=described_digit_words())
    save_described_digit_folder(data_dir, TRAIN_DIGITS, seed=seed)
    untrained = evaluate(CLIPModel.from_pretrained(init_dir), AutoProcessor.from_pretrained(init_dir))
    print(f"   untrained: zero-shot accuracy {untrained['zero_shot_accuracy']:.3f} held out (chance {chance})")
    train_contrastive(
        init_dir,
        data_dir,
        dense_dir,
        [".*"],
        max_steps=pretrain_steps,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        seed=seed,
        disable_tqdm=False,
    )
    dense = CLIPModel.from_pretrained(dense_dir)
    dense_scores = evaluate(dense, AutoProcessor.from_pretrained(dense_dir))
    print(f"   after {pretrain_steps} steps -> {dense_dir}: {_scores(dense_scores)}")

    upcycled_dir = output_dir / "sparse-upcycled"
    print(f"2. Sparse upcycling into a 4-expert, top-2 CLIP-MoE in {upcycled_dir}")
    upcycled = upcycle_clip(dense_dir, upcycled_dir, num_experts=4, top_k=2, seed=seed, overwrite=True)
    difference = max_feature_difference(upcycled, dense)
    print(f"   max |MoE - dense| image feature = {difference:.2e} (upcycling keeps the dense function)")

    mcl_dir, moe_dir = output_dir / "mcl", output_dir / "clip-moe"
    print("3. CLIP-MoE's recipe on the same captioned digits")
    mcl_moe_dir = run_digit_mcl(
        dense_dir,
        data_dir,
        mcl_dir,
        dict(num_experts=3, top_k=2, image_clusters=2, text_clusters=2),
        max_steps=40,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        seed=seed,
    )
    print(f"   MCL: stage0 (the base) + 2 stages trained on cluster-homogeneous batches -> {mcl_moe_dir}")
    train_digit_router(
        mcl_moe_dir,
        data_dir,
        moe_dir,
        max_steps=40,
        per_device_train_batch_size=64,
        learning_rate=1e-2,
        weight_decay=0.01,
        seed=seed,
    )
    print(f"   router training (routers only; CLIP loss + 0.01 x balance loss) -> {moe_dir}")

    moe_scores = evaluate(CLIPMoEModel.from_pretrained(moe_dir), AutoProcessor.from_pretrained(moe_dir))
    print(f"4. On {len(HELD_OUT_DIGITS)} held-out digits ({num_captions} distinct captions for retrieval):")
    print(f"   dense CLIP: {_scores(dense_scores)}")
    print(f"   CLIP-MoE:   {_scores(moe_scores)}")

    print("5. In a fresh Python process where hf_moe cannot be imported (as for a Hub user):")
    print("   AutoModel.from_pretrained(folder, trust_remote_code=True) and")
    print(f"   pipeline('zero-shot-image-classification') on the {len(HELD_OUT_DIGITS)} held-out digits")
    images_dir = output_dir / "held-out"
    images_dir.mkdir(parents=True)
    image_paths = [str(images_dir / f"{index}.png") for index in HELD_OUT_DIGITS]
    for image, path in zip(digit_images_at(HELD_OUT_DIGITS), image_paths):
        image.save(path)
    reloaded = reload_without_hf_moe(moe_dir, image_paths)
    labels = list(evaluate.classification["label"])
    agree = sum(a == b for a, b in zip(reloaded["predictions"], moe_scores["predictions"]))
    reloaded_accuracy = sum(p == label for p, label in zip(reloaded["predictions"], labels)) / len(labels)
    print(
        f"   loaded {reloaded['class']}: {reloaded['parameters']:,} parameters "
        f"({reloaded['expert_parameters']:,} in experts)"
    )
    print(f"   true:      {' '.join(map(str, labels[:20]))} ...")
    print(f"   predicted: {' '.join(map(str, reloaded['predictions'][:20]))} ...")
    print(f"   accuracy {reloaded_accuracy:.3f}; the same prediction as in-process for {agree}/{len(labels)} digits")

    routing_dir = write_demo_routing(moe_dir, output_dir, seed)
    print(f"6. Which experts route the held-out digits and their captions (hf-moe analyze-routing): {routing_dir}")
    print(f"   figures: {', '.join(sorted(path.name for path in routing_dir.glob('*.png')))}")
    return {
        "untrained_zero_shot_accuracy": untrained["zero_shot_accuracy"],
        "dense": {key: value for key, value in dense_scores.items() if key != "predictions"},
        "clip_moe": {key: value for key, value in moe_scores.items() if key != "predictions"},
        "chance_zero_shot_accuracy": chance,
        "num_held_out_images": len(HELD_OUT_DIGITS),
        "num_retrieval_captions": num_captions,
        "max_abs_difference": difference,
        "reloaded": {**reloaded, "zero_shot_accuracy": reloaded_accuracy},
        "in_process_predictions": moe_scores["predictions"],
        "labels": labels,
        "model_dir": str(moe_dir),
        "routing_dir": str(routing_dir),
    }

"""WEMoE's step of `hf-moe demo`, offline on a CPU in under a minute (2 cores):

1. a small CLIP built locally and two fine-tunes of its vision tower, one per task (generated shapes and stripe
   patterns from `hf_moe.task_data`), the way the public `tanganke/clip-vit-base-patch32_<task>` experts are
   vision-only fine-tunes of one pretrained CLIP;
2. the fine-tunes merged by task arithmetic and into a WEMoE with the converter users run on the Hub experts;
3. the routers adapted at test time (entropy of the zero-shot predictions on unlabeled test images);
4. per-task zero-shot accuracy of each model, and each sample's routing weights before and after;
5. the adapted WEMoE saved and reloaded with `trust_remote_code=True` in a process where hf_moe cannot be imported;
6. its routing of every held-out image (`hf-moe analyze-routing`): OUTPUT_DIR/routing/routing.md and its figures.

    hf-moe demo --family we_moe [--output_dir outputs/demo]      (writes OUTPUT_DIR/wemoe)
"""

import json
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, CLIPModel
from transformers.utils import logging

from ..conversion import merge_wemoe
from ..evaluation import projected_embeddings, zero_shot_classification
from ..experiments import quiet_tiny_run, run_as_hub_user
from ..fileio import atomic_output_dir, atomic_output_file
from ..loading import load_pretrained
from ..merging import merge_clip_vision, vision_tower_module
from ..routing_report import RoutingArguments, write_routing_report
from ..task_data import build_tasks, save_task_folders
from ..toy import save_toy_clip
from .routing import analyze_routing
from .tta import TaskBatches, TTATrainer, TTATrainingArguments, zero_shot_heads


logger = logging.get_logger(__name__)

DEMO_TASKS = ("digits", "patterns")
RESULT_FILE = "demo_result.json"

# Runs after experiments.BLOCK_HF_MOE, in a fresh interpreter in which importing hf_moe fails: the model must load
# from the folder's own code.
HUB_USER_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModel

model_dir, pixels = sys.argv[1:]
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
with torch.no_grad():
    features = model.get_image_features(pixel_values=torch.load(pixels)).pooler_output
print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}", "features": features.tolist()}))
"""


def finetune_vision_tower(
    pretrained_dir: Path, task, output_dir: Path, steps: int, batch_size: int = 32, learning_rate: float = 1e-3, seed=0
) -> Path:
    """Fine-tune the vision tower only (text tower, projections and logit scale frozen) by cross-entropy against
    the frozen zero-shot head of `task`. A plain loop: the loss needs the task's head, not caption pairs, and a
    few hundred CPU steps need none of the Trainer's machinery."""
    torch.manual_seed(seed)
    model = CLIPModel.from_pretrained(pretrained_dir)
    processor = AutoProcessor.from_pretrained(pretrained_dir)
    head = zero_shot_heads(model, processor, {task.name: task.class_names}, {task.name: task.templates})[task.name]
    model.requires_grad_(False)
    trainable = list(vision_tower_module(model).parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    pixel_values = processor.image_processor(images=task.images("train"), return_tensors="pt")["pixel_values"]
    labels = torch.tensor(task.labels("train"))
    optimizer = torch.optim.Adam(trainable, lr=learning_rate)
    scale = model.logit_scale.detach().exp()
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(labels), (batch_size,))
        embeddings = projected_embeddings(model.get_image_features(pixel_values=pixel_values[rows]))
        logits = scale * torch.nn.functional.normalize(embeddings, dim=-1) @ head.T
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def test_time_adapt(
    model,
    processor,
    tasks,
    output_dir: Path,
    trainable: list[str],
    learning_rate: float,
    steps: int,
    batch_size: int,
    seed=0,
):
    """Entropy TTA with `TTATrainer` on the unlabeled TEST images of every task (only `trainable` train), in memory
    (no checkpoints: a demo-sized run)."""
    heads = zero_shot_heads(
        model,
        processor,
        {name: task.class_names for name, task in tasks.items()},
        {name: task.templates for name, task in tasks.items()},
    )
    unlabeled = {name: task.dataset("test").remove_columns("label") for name, task in tasks.items()}
    dataset = TaskBatches(unlabeled, processor.image_processor, batch_size, steps, seed=seed)
    training_args = TTATrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        trainable_parameters=trainable,
        seed=seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    TTATrainer(model=model, args=training_args, train_dataset=dataset, heads=heads).train()
    return model.eval()


def task_accuracies(model, processor, tasks) -> dict[str, float]:
    """Zero-shot top-1 accuracy on each task's test split (its templates and class names), routed per sample."""
    return {
        name: zero_shot_classification(
            model, processor, task.dataset("test"), list(task.templates), task.class_names, progress=False
        )["top1_accuracy"]
        for name, task in tasks.items()
    }


def caption_words(tasks) -> list[str]:
    """Every word of the class names and templates: whole-word tokens of the small CLIP's tokenizer."""
    words = set()
    for task in tasks.values():
        for text in [*task.class_names, *task.templates]:
            words.update(re.findall(r"[A-Za-z0-9]+", text))
    return sorted(words)


@torch.no_grad()
def routing_weights(model, pixel_values) -> list[list[float]]:
    """Each image's routing weights in the last WEMoE block."""
    return model.vision_model(pixel_values=pixel_values, output_routing_weights=True).routing_weights[-1].tolist()


def write_demo_routing(model_dir: Path, tasks, output_dir: Path) -> Path:
    """`hf-moe analyze-routing` of `model_dir` on every task's held-out images (one task folder each, named as the
    model's tasks): writes OUTPUT_DIR/routing (routing.md, routing.json, the figures)."""
    data_dir = output_dir / "held-out-tasks"
    for name, task in tasks.items():
        save_task_folders(task, data_dir / name, "test")
    routing_dir = output_dir / "routing"
    args = RoutingArguments(
        model=str(model_dir), data=str(data_dir), output_dir=str(routing_dir), batch_size=64, device="cpu"
    )
    write_routing_report(analyze_routing(args, progress=False), routing_dir, overwrite=True)
    return routing_dir


def run(output_dir: Path, finetune_steps: int = 200, tta_steps: int = 60, seed: int = 0) -> dict:
    """Run the WEMoE demo in `output_dir` (its sub-folders are recreated) and return its numbers."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    # One torch thread, as in every demo: the figures then do not depend on the machine's core count, and a tiny
    # model's step is faster than with threads waiting on each other on busy cores.
    with quiet_tiny_run():
        result = _run(output_dir, finetune_steps, tta_steps, seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_output_file(output_dir / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Done in {result['seconds']:.0f} s. The adapted WEMoE folder is {(output_dir / 'wemoe-tta').resolve()}")
    return result


def _run(output_dir: Path, finetune_steps: int, tta_steps: int, seed: int) -> dict:
    outputs = ("pretrained", *(f"finetuned-{task}" for task in DEMO_TASKS), "task-arithmetic", "wemoe", "wemoe-tta")
    for name in (*outputs, "held-out-tasks", "routing"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    tasks = build_tasks(DEMO_TASKS, train_per_class=48, test_per_class=24, seed=seed)
    print("WEMoE: merging fine-tuned CLIP vision towers into one weight-ensembling MoE")

    print(f"1. A small CLIP and a vision-only fine-tune of it per task ({', '.join(DEMO_TASKS)})")
    pretrained = save_toy_clip(output_dir / "pretrained", seed=seed, words=caption_words(tasks))
    finetuned = [
        finetune_vision_tower(pretrained, task, output_dir / f"finetuned-{name}", finetune_steps, seed=seed)
        for name, task in tasks.items()
    ]
    print("2. Merging them: task arithmetic (lambda 0.3) and WEMoE (hf-moe merge-wemoe)")
    merge_clip_vision("task_arithmetic", pretrained, finetuned, output_dir / "task-arithmetic")
    merge_wemoe(pretrained, finetuned, output_dir / "wemoe", task_names=list(DEMO_TASKS), seed=seed)

    processor = AutoProcessor.from_pretrained(pretrained)
    accuracy = {}
    for label, folder in [("pretrained", pretrained), ("task arithmetic", output_dir / "task-arithmetic")]:
        accuracy[label] = task_accuracies(load_pretrained(folder, CLIPModel).eval(), processor, tasks)
    accuracy["fine-tune (own task)"] = {
        name: task_accuracies(CLIPModel.from_pretrained(folder).eval(), processor, {name: task})[name]
        for (name, task), folder in zip(tasks.items(), finetuned)
    }
    wemoe = load_pretrained(output_dir / "wemoe").eval()
    accuracy["WEMoE (before TTA)"] = task_accuracies(wemoe, processor, tasks)
    pixel_values = processor.image_processor(
        images=[tasks[name].images("test")[0] for name in DEMO_TASKS], return_tensors="pt"
    )["pixel_values"]
    routing = {"before TTA": routing_weights(wemoe, pixel_values)}
    print(f"3. Test-time adaptation: {tta_steps} steps on the unlabeled test images of both tasks, routers only")
    test_time_adapt(wemoe, processor, tasks, output_dir / "tta-run", ["router"], 1e-2, tta_steps, 16, seed)
    shutil.rmtree(output_dir / "tta-run", ignore_errors=True)
    accuracy["WEMoE + TTA"] = task_accuracies(wemoe, processor, tasks)
    routing["after TTA"] = routing_weights(wemoe, pixel_values)
    print("4. Zero-shot accuracy on each task's held-out images:")
    for label, scores in accuracy.items():
        print(f"   {label:<22}" + "  ".join(f"{name} {value:.3f}" for name, value in scores.items()))

    print("   (the entropy falls; on this toy's weak text tower accuracy need not follow: see the README's experiment)")
    for when, weights in routing.items():
        for name, row in zip(DEMO_TASKS, weights):
            print(f"   a {name} image's routing weights, last block, {when}: " + ", ".join(f"{w:+.3f}" for w in row))

    print("5. Saved, then reloaded in a fresh Python process where hf_moe cannot be imported (as for a Hub user):")
    with atomic_output_dir(output_dir / "wemoe-tta", overwrite=True) as tmp:
        wemoe.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    with torch.no_grad():
        in_process = wemoe.get_image_features(pixel_values=pixel_values).pooler_output
    pixels_path = output_dir / "wemoe-demo-pixels.pt"
    torch.save(pixel_values, pixels_path)
    try:
        reloaded = run_as_hub_user(HUB_USER_SCRIPT, [output_dir / "wemoe-tta", pixels_path], output_dir / "wemoe-tta")
    finally:
        pixels_path.unlink()
    difference = (torch.tensor(reloaded["features"]) - in_process).abs().max().item()
    print(f"   loaded {reloaded['class']}; max |reloaded - in-process| image feature = {difference:.2e}")

    routing_dir = write_demo_routing(output_dir / "wemoe-tta", tasks, output_dir)
    analysis = json.loads((routing_dir / "routing.json").read_text())["numbers"]
    print(f"6. The adapted WEMoE's routing of every held-out image (hf-moe analyze-routing): {routing_dir}")
    own, separation = analysis["own_task_accuracy"]["all_blocks"], analysis["nearest_centroid_accuracy"]
    print(
        f"   own task's vector largest (weights averaged over blocks) for {own:.0%} of the images; nearest-centroid "
        f"separation {separation:.0%}"
    )
    result = {
        "tasks": list(DEMO_TASKS),
        "num_test_images": {name: len(task.labels("test")) for name, task in tasks.items()},
        "accuracy": accuracy,
        "routing_weights_last_block": routing,
        "reloaded_class": reloaded["class"],
        "reload_max_difference": difference,
        "routing_dir": str(routing_dir),
        "routing_own_task_accuracy": own,
    }
    return result

"""MoDE in about a minute on one CPU core, offline: data experts of one small CLIP, ensembled per task.

1. a small CLIP (`hf_moe.toy`, whole-word tokens) trained contrastively on captioned handwritten digits
   ("a heavy narrow seven", scikit-learn's digits) as the SEED model;
2. `hf-moe mode cluster`: the captions embedded with the seed's own text tower ("clip" pooling, so that no other
   model is needed), fine balanced k-means, then the fine centers grouped into 2 coarse clusters = 2 data experts;
3. `hf-moe mode train-expert` for each: the whole seed CLIP trained a few steps on its clusters' pairs plus 2% of
   the others;
4. `hf-moe mode build`: one `MoDEModel` folder; the held-out digits classified through
   `pipeline("zero-shot-image-classification", model=OUT, trust_remote_code=True)`, whose predictions must be the
   model's own argmax; per-expert, uniform and task-adaptive ensemble accuracy and the task weights are printed;
5. `hf-moe analyze-routing` of the built model: its task weights on five digit tasks (experts x tasks), its fine
   clusters and pairs per expert (OUTPUT_DIR/mode-routing/report: routing.md, routing.json, the figures).

    hf-moe demo --family mode [--output_dir outputs/demo]

The helpers here (seed training, the pipeline steps called from Python) also serve
`examples/mode/experiment.py`. Every result-changing hyper-parameter is set here: the library's defaults are the
paper's (ViT-B on billions of pairs) and would barely move a tiny CLIP in a few CPU steps.
"""

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, CLIPModel, pipeline

from ..conversion import build_mode
from ..data import ImageTextCollator, load_image_text_dataset
from ..evaluation import class_task_weights, zero_shot_classification
from ..experiments import quiet_tiny_run
from ..fileio import atomic_output_file
from ..loading import load_pretrained
from ..toy import save_toy_clip
from ..toy_data import (
    DIGIT_NAMES,
    INK_WORDS,
    NUM_DIGITS,
    WIDTH_WORDS,
    described_digit_words,
    digit_classification_dataset,
    save_described_digit_folder,
)
from .cluster import ClusterArguments, cluster_pairs
from .embed import EncoderArguments
from .report import evaluate_task
from .train_expert import DataExpertArguments, DataExpertTrainer, DataExpertTrainingArguments, train_expert


RESULT_FILE = "mode_demo_result.json"
# What the demo writes in OUTPUT_DIR; a re-run removes these (and only these) first, so that it starts afresh
# instead of being refused by the jobs recorded there by the previous run. `hf-moe demo` gives every family the same
# OUTPUT_DIR: the "mode-" names keep clear of the CLIP-MoE demo's ("digit-captions", "demo_result.json", ...).
DEMO_OUTPUTS = ("mode-seed-init", "mode-seed-clip", "mode-captions", "mode-clusters", "mode-experts", "mode-model")
MODEL_DIR = DEMO_OUTPUTS[-1]
HELD_OUT_DIGITS = range(1500, NUM_DIGITS)
PROMPT = "a handwritten digit {}"
# `hf-moe analyze-routing` of the built model: its task weights on these tasks (class names and templates).
ROUTING_DIR = "mode-routing"
ROUTING_TASKS = {
    "digits": {"class_names": list(DIGIT_NAMES), "templates": [PROMPT]},
    "digits 0-4": {"class_names": list(DIGIT_NAMES[:5]), "templates": [PROMPT]},
    "digits 5-9": {"class_names": list(DIGIT_NAMES[5:]), "templates": [PROMPT]},
    "ink": {"class_names": list(INK_WORDS), "templates": ["a {} digit"]},
    "width": {"class_names": list(WIDTH_WORDS), "templates": ["a {} digit"]},
}


def training_arguments(output_dir: str | Path, **fields) -> DataExpertTrainingArguments:
    """The data experts' recipe (AdamW, cosine) with CPU settings: no checkpoints, logs or progress bars; `fields`
    override (`max_steps`, `learning_rate`, ...).

    The logit scale is fixed at 100, where CLIP's learned one ends (and where the experts' cap is): from CLIP's init
    (14.3) a tiny CLIP spends most of a few hundred steps growing it and barely learns (loss ~ log(batch size)).
    Zero-shot predictions and the ensemble (of cosines) do not depend on it. Gradient clipping at 1 and label
    smoothing 0.1 are the CLIP-MoE demo's digit recipe: with them a tiny CLIP reaches ~80% zero-shot on held-out
    digits in 600 steps, without them (and at lr 2e-3, 300 steps) it stayed at ~15%."""
    settings = dict(
        logit_scale=100.0,
        max_grad_norm=1.0,
        label_smoothing=0.1,
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(fields)
    settings.setdefault("warmup_steps", max(1, settings.get("max_steps", 10) // 10))
    return DataExpertTrainingArguments(**settings)


def train_seed(init_dir: Path, data_dir: Path, output_dir: Path, **fields) -> Path:
    """The seed CLIP: every parameter of `init_dir` trained on all of `data_dir` with the experts' recipe (MoDE's
    seed is an ordinary CLIP run on all the data, the experts continue it)."""
    processor = AutoProcessor.from_pretrained(init_dir)
    trainer = DataExpertTrainer(
        model=load_pretrained(init_dir, require_moe=False),
        args=training_arguments(output_dir, **fields),
        train_dataset=load_image_text_dataset(data_dir),
        data_collator=ImageTextCollator(processor),
    )
    trainer.train()
    trainer.save_model()
    processor.save_pretrained(output_dir)
    return Path(output_dir)


def cluster_captions(
    data_dir: Path, seed_dir: Path, output_dir: Path, num_experts: int, num_fine_clusters: int, seed: int = 0
) -> Path:
    """`hf-moe mode cluster` with the seed CLIP's text tower as the caption encoder ("clip" pooling)."""
    args = ClusterArguments(
        data=str(data_dir),
        num_experts=num_experts,
        output_dir=str(output_dir),
        num_fine_clusters=num_fine_clusters,
        seed=seed,
    )
    return cluster_pairs(args, EncoderArguments(encoder=str(seed_dir), pooling="clip", batch_size=512))


def train_data_expert(
    seed_dir: Path, data_dir: Path, clusters: Path, expert: int, output_dir: Path, other_share: float = 0.02, **fields
) -> Path:
    """`hf-moe mode train-expert` for expert `expert`; `fields` are `training_arguments` fields."""
    script_args = DataExpertArguments(
        seed_model=str(seed_dir), data=str(data_dir), clusters=str(clusters), expert=expert, other_share=other_share
    )
    return train_expert(script_args, training_arguments(output_dir, **fields))


def run_demo(
    output_dir: str | Path = "outputs/demo",
    seed_steps: int = 600,
    expert_steps: int = 40,
    train_digits: int = 1200,
    seed: int = 0,
) -> dict:
    """Run the MoDE demo in `output_dir` (its demo sub-folders are recreated): the first `train_digits` digits are
    captioned for training, the last 297 are held out. Returns its numbers."""
    if not 1 <= train_digits <= HELD_OUT_DIGITS.start:
        raise ValueError(f"train_digits must be in [1, {HELD_OUT_DIGITS.start}] (the rest are held out).")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    for name in DEMO_OUTPUTS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    with quiet_tiny_run():
        result = _run(output_dir, seed_steps, expert_steps, range(train_digits), seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_output_file(output_dir / RESULT_FILE) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Done in {result['seconds']:.0f} s. The MoDE model folder is {(output_dir / MODEL_DIR).resolve()}")
    return result


def _run(output_dir: Path, seed_steps: int, expert_steps: int, train_digits: range, seed: int) -> dict:
    init_dir, seed_dir, data_dir, clusters_dir, experts_dir, mode_dir = (output_dir / name for name in DEMO_OUTPUTS)
    schedule = dict(per_device_train_batch_size=64, seed=seed)

    print(f"1. Seed CLIP: a small CLIP trained {seed_steps} steps on {len(train_digits)} captioned digits")
    save_toy_clip(init_dir, seed=seed, words=described_digit_words())
    save_described_digit_folder(data_dir, train_digits, seed=seed)
    train_seed(init_dir, data_dir, seed_dir, max_steps=seed_steps, learning_rate=3e-3, weight_decay=0.1, **schedule)

    print("2. hf-moe mode cluster: captions embedded by the seed's text tower, 16 fine clusters -> 2 experts")
    cluster_captions(data_dir, seed_dir, clusters_dir, num_experts=2, num_fine_clusters=16, seed=seed)
    info = json.loads((clusters_dir / "clusters.json").read_text())
    print(f"   pairs per expert: {info['expert_sizes']}")

    print(f"3. hf-moe mode train-expert: each expert continues the seed {expert_steps} steps on its clusters + 2%")
    experts = [
        train_data_expert(
            seed_dir,
            data_dir,
            clusters_dir,
            k,
            experts_dir / f"expert-{k}",
            max_steps=expert_steps,
            learning_rate=5e-4,
            weight_decay=0.1,
            **schedule,
        )  # fmt: skip
        for k in range(2)
    ]

    print(f"4. hf-moe mode build -> {mode_dir}; {len(HELD_OUT_DIGITS)} held-out digits through the pipeline")
    build_mode(experts, clusters_dir, mode_dir)
    dataset = digit_classification_dataset(HELD_OUT_DIGITS)
    images, labels = list(dataset["image"]), list(dataset["label"])
    classifier = pipeline("zero-shot-image-classification", model=str(mode_dir), trust_remote_code=True)
    # The task's templates ([PROMPT], as the report row below) give the pipeline's task weights.
    outputs = classifier(
        images, candidate_labels=DIGIT_NAMES, hypothesis_template=PROMPT, task_templates=[PROMPT], batch_size=64
    )
    pipeline_predictions = [DIGIT_NAMES.index(output[0]["label"]) for output in outputs]

    model = AutoModel.from_pretrained(mode_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(mode_dir)
    with torch.no_grad():
        texts = [PROMPT.format(name) for name in DIGIT_NAMES]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        # The same weights as the pipeline's: the class names averaged over the task's templates (hf-moe eval's).
        task_weights = class_task_weights(model, processor.tokenizer, DIGIT_NAMES, [PROMPT], progress=False)
        model_predictions = model(**inputs, task_weights=task_weights).logits_per_image.argmax(dim=-1).tolist()
    # `hf-moe mode report`'s row: each expert, their uniform mean and the task-adaptive ensemble, same prompt.
    report = evaluate_task(model, processor, dataset, DIGIT_NAMES, [PROMPT], name="digits", progress=False)
    scores = {
        "experts": [report.row[f"expert-{k}"] for k in range(len(experts))],
        "all_unit": report.row["all_unit"],
        "ensemble": report.row["ensemble"],
        "task_weights": report.task_weights.tolist(),
    }
    pipeline_accuracy = sum(p == label for p, label in zip(pipeline_predictions, labels)) / len(labels)
    agree = sum(a == b for a, b in zip(pipeline_predictions, model_predictions))
    weights = ", ".join(f"{w:.3f}" for w in scores["task_weights"])
    seed_accuracy = zero_shot_classification(
        CLIPModel.from_pretrained(seed_dir), processor, dataset, [PROMPT], DIGIT_NAMES, progress=False
    )["top1_accuracy"]
    print(f"   zero-shot accuracy (chance {1 / len(DIGIT_NAMES):.1f}):")
    print(f"     seed CLIP:                {seed_accuracy:.3f}")
    for k, value in enumerate(scores["experts"]):
        print(f"     expert {k}:                 {value:.3f}")
    print(f"     uniform ensemble:         {scores['all_unit']:.3f}")
    print(f"     task-adaptive ensemble:   {scores['ensemble']:.3f}  (task weights {weights})")
    print(f"     pipeline:                 {pipeline_accuracy:.3f}  (= the model's argmax for {agree}/{len(labels)})")
    routing_dir = analyze_demo_routing(mode_dir, clusters_dir, output_dir / ROUTING_DIR)
    return {
        "routing_dir": str(routing_dir),
        "seed_accuracy": seed_accuracy,
        **scores,
        "pairs_per_expert": info["expert_sizes"],
        "pipeline_accuracy": pipeline_accuracy,
        "pipeline_predictions": pipeline_predictions,
        "model_predictions": model_predictions,
        "labels": labels,
        "model_dir": str(mode_dir),
    }


def analyze_demo_routing(mode_dir: Path, clusters_dir: Path, routing_dir: Path) -> Path:
    """`hf-moe analyze-routing` of the built model on `ROUTING_TASKS` (written to `routing_dir/tasks.json`, the
    report to `routing_dir/report`) with its clusters; prints where the report went and the task weights."""
    from ..routing_report import RoutingArguments, write_routing_report
    from .routing import analyze_routing

    shutil.rmtree(routing_dir, ignore_errors=True)
    routing_dir.mkdir(parents=True)
    tasks = routing_dir / "tasks.json"
    tasks.write_text(json.dumps(ROUTING_TASKS, indent=1) + "\n")
    args = RoutingArguments(
        model=str(mode_dir), data=str(tasks), output_dir=str(routing_dir / "report"), clusters=str(clusters_dir)
    )
    report = analyze_routing(args, progress=False)
    write_routing_report(report, routing_dir / "report")
    weights = "; ".join(
        f"{task} " + "/".join(f"{w:.2f}" for w in numbers["task_weights"])
        for task, numbers in report.numbers["tasks"].items()
    )
    print(f"5. hf-moe analyze-routing -> {routing_dir / 'report' / 'routing.md'}")
    print(f"   task weights (expert 0/1): {weights}")
    return routing_dir / "report"

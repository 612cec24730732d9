"""MoIIE's step of `hf-moe demo`, offline on a CPU in one to three minutes (2 cores):

1. a small SigLIP vision tower and a small Phi-3 with a word-level tokenizer, built locally, trained dense end to end
   on "what digit is this ?" about scikit-learn's digits and on text-only questions ("is seven even ?"): the stand-in
   for the separately pretrained SigLIP and LLM a real MoIIE starts from; then split back into those two parts;
2. upcycled into a MoIIE (1 vision, 2 shared, 1 language expert per MoE layer, top-2) with `upcycle_moiie`;
3. stage 1 (a new projector) and stage 2 (LLM + MoE + projector) training with `hf-moe train-moiie`'s function on
   digit questions ("what digit is this ?", "is it even ?", "is it greater than four ?");
4. the accuracy of each kind of question on the 297 held-out digits, and the answers of
   `pipeline("image-text-to-text", trust_remote_code=True)` on the saved folder to "what digit is this ?" about the
   first held-out digits, each next to the truth;
5. the same questions answered in a fresh Python process where hf_moe cannot be imported (as for a Hub user);
6. `hf-moe analyze-routing` of the trained model on held-out digit questions and text-only questions
   (OUTPUT_DIR/moiie/moiie-routing: routing.md, routing.json and the figures of each expert's share of the vision and
   language tokens per MoE layer).

    hf-moe demo --family moiie [--output_dir outputs/demo]      (writes OUTPUT_DIR/moiie)

It is the recipe of examples/moiie/experiment_digits.py for its MoIIE variant and seed 0 (same data, sizes, steps and
learning rate), so the held-out accuracies printed are that experiment's seed-0 MoIIE row; the experiment compares
MoIIE with dense, vanilla and modality MoEs over 3 seeds.
"""

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor
from transformers.utils import logging

from ..conversion import upcycle_moiie
from ..experiments import quiet_tiny_run, run_as_hub_user
from ..fileio import atomic_output_file
from ..toy_data import DIGIT_NAMES, digit_images_at
from .toy import (
    IMAGE_QUESTIONS,
    digit_labels,
    save_dense_parts,
    save_digit_images,
    save_digit_questions,
    save_toy_parts,
    toy_processor,
)
from .train import MoIIEScriptArguments, train_moiie
from .trainer import MoIIETrainingArguments


logger = logging.get_logger(__name__)

RESULT_FILE = "demo_result.json"
TRAIN_DIGITS = range(0, 1500)
HELD_OUT_DIGITS = range(1500, 1797)
# The recipe of examples/moiie/experiment_digits.py (its defaults), for the MoIIE variant and one seed.
HIDDEN_SIZE = 64
IMAGE_SIZE = 16
DEMO_STEPS = {"base": 250, "stage1": 50, "stage2": 150}
# Held-out digits whose answers the demo shows, through the pipeline and in a process without hf_moe.
NUM_SHOWN = 8
# What the demo writes in OUTPUT_DIR; a re-run removes these first.
DEMO_OUTPUTS = ("init", "dense-init", "dense", "parts", "data", "moiie-upcycled", "moiie-stage1", "moiie-stage2")
# `hf-moe analyze-routing` of the trained model, on held-out digit questions and text-only questions.
ROUTING_DIR = "moiie-routing"
ROUTING_DIGITS = range(1500, 1564)
ROUTING_TEXT_ONLY_PER_KIND = 32

# Runs after experiments.BLOCK_HF_MOE, in a fresh interpreter in which importing hf_moe fails: model and processor
# load from the folder's own code.
HUB_USER_SCRIPT = r"""
import json, sys
from PIL import Image
from transformers import pipeline

model_dir, question, *image_paths = sys.argv[1:]
pipe = pipeline("image-text-to-text", model=model_dir, trust_remote_code=True)
messages = [[{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                          {"type": "text", "text": question}]}] for path in image_paths]
outputs = pipe(text=messages, max_new_tokens=1, do_sample=False)
print(json.dumps({"class": f"{type(pipe.model).__module__}.{type(pipe.model).__name__}",
                  "answers": [output[0]["generated_text"][-1]["content"].strip() for output in outputs]}))
"""


def train_stage(
    model_dir: Path, data: Path, image_folder: Path, output_dir: Path, stage: str, steps: int, **training_kwargs
) -> Path:
    """One MoIIE training stage through `hf-moe train-moiie`'s function (MoIIETrainer), CPU, no checkpoints."""
    training_args = MoIIETrainingArguments(
        output_dir=str(output_dir),
        stage=stage,
        max_steps=steps,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **training_kwargs,
    )
    return train_moiie(
        MoIIEScriptArguments(model=str(model_dir), data=str(data), image_folder=str(image_folder)), training_args
    )


def question_inputs(processor, images, kinds: list[str]) -> dict:
    """Processor inputs (left-padded, ending in the generation prompt) asking `IMAGE_QUESTIONS[kinds[i]]` about
    `images[i]`."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{IMAGE_QUESTIONS[kind][0]}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for kind in kinds
    ]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")


@torch.no_grad()
def answer_questions(model, processor, images, kinds: list[str], batch_size: int = 128) -> list[str]:
    """Greedy one-token answers (the first token `generate(do_sample=False)` would emit: the argmax over the whole
    vocabulary after the generation prompt) to the `IMAGE_QUESTIONS` kind `kinds[i]` about `images[i]`."""
    model.eval()
    answers = []
    for start in range(0, len(images), batch_size):
        inputs = question_inputs(processor, images[start : start + batch_size], kinds[start : start + batch_size])
        next_tokens = model(**inputs).logits[:, -1].argmax(-1)
        answers += [processor.tokenizer.decode(token).strip() for token in next_tokens.tolist()]
    return answers


def answer_accuracy(model, processor, indices, size: int = 16) -> dict[str, float]:
    """Per question kind, the share of the digits at `indices` answered right (`answer_questions`)."""
    indices = list(indices)
    images, labels = digit_images_at(indices, size), digit_labels(indices)
    accuracy = {}
    for kind, (_, answer) in IMAGE_QUESTIONS.items():
        predicted = answer_questions(model, processor, images, [kind] * len(images))
        accuracy[kind] = sum(p == answer(label) for p, label in zip(predicted, labels)) / len(labels)
    return accuracy


def pipeline_answers(model_dir: Path, image_paths: list[str], question: str) -> list[str]:
    """The `image-text-to-text` pipeline's greedy one-token answers to `question` about each image, in this
    process."""
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(model_dir), trust_remote_code=True)
    messages = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": Image.open(path)}, {"type": "text", "text": question}],
            }
        ]
        for path in image_paths
    ]
    outputs = pipe(text=messages, max_new_tokens=1, do_sample=False)
    return [output[0]["generated_text"][-1]["content"].strip() for output in outputs]


def run_demo(
    output_dir: str | Path,
    base_steps: int = DEMO_STEPS["base"],
    stage1_steps: int = DEMO_STEPS["stage1"],
    stage2_steps: int = DEMO_STEPS["stage2"],
    seed: int = 0,
) -> dict:
    """Run the MoIIE demo in `output_dir` (its sub-folders are recreated) and return its numbers."""
    started = time.perf_counter()
    with quiet_tiny_run():
        result = _run_demo(Path(output_dir), base_steps, stage1_steps, stage2_steps, seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_output_file(Path(output_dir) / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Done in {result['seconds']:.0f} s. The trained MoIIE folder is {Path(result['model_dir']).resolve()}")
    return result


def _run_demo(output_dir: Path, base_steps: int, stage1_steps: int, stage2_steps: int, seed: int) -> dict:
    for name in DEMO_OUTPUTS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    print("MoIIE: a vision-language model whose MoE layers hold vision-only, shared and language-only experts")
    print(
        f"1. A small SigLIP + Phi-3 (hidden {HIDDEN_SIZE}, word-level tokenizer), built locally and trained dense "
        f"end to end for {base_steps} steps (the stand-in for pretrained parts), then split back into its parts"
    )
    processor = toy_processor(image_size=IMAGE_SIZE)
    size = dict(vision_hidden_size=HIDDEN_SIZE, text_hidden_size=HIDDEN_SIZE)
    llm, vision = save_toy_parts(output_dir / "init", processor, seed=seed, **size)
    images = output_dir / "data" / "images"
    data = output_dir / "data"
    base_data = save_digit_questions(
        data / "base.json", images, TRAIN_DIGITS, ["digit"], IMAGE_SIZE, text_only_per_kind=len(TRAIN_DIGITS)
    )
    stage1_data = save_digit_questions(data / "stage1.json", images, TRAIN_DIGITS, ["digit"], IMAGE_SIZE)
    stage2_data = save_digit_questions(data / "stage2.json", images, TRAIN_DIGITS, list(IMAGE_QUESTIONS), IMAGE_SIZE)
    training = dict(per_device_train_batch_size=32, learning_rate=1e-3, seed=seed, logging_strategy="no")
    upcycle_moiie(
        llm, vision, output_dir / "dense-init", variant="dense", image_token_id=processor.image_token_id, seed=seed
    )
    base = train_stage(
        output_dir / "dense-init", base_data, images, output_dir / "dense", "finetune", base_steps,
        train_vision_tower=True, **training,
    )  # fmt: skip
    llm, vision = save_dense_parts(base, output_dir / "parts")

    print("2. Upcycled into MoIIE: 1 vision / 2 shared / 1 language expert in the odd layers, top-2 (upcycle_moiie)")
    upcycled = output_dir / "moiie-upcycled"
    upcycle_moiie(llm, vision, upcycled, image_token_id=processor.image_token_id, seed=seed)
    print(
        f"3. hf-moe train-moiie: stage 1 ({stage1_steps} steps, a new projector), stage 2 ({stage2_steps} steps, "
        "LLM + MoE + projector) on the 1500 training digits"
    )
    stage1 = train_stage(
        upcycled, stage1_data, images, output_dir / "moiie-stage1", "pretrain", stage1_steps, **training
    )
    model_dir = train_stage(
        stage1, stage2_data, images, output_dir / "moiie-stage2", "finetune", stage2_steps, **training
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    accuracy = answer_accuracy(model, AutoProcessor.from_pretrained(model_dir), HELD_OUT_DIGITS, IMAGE_SIZE)
    print(f"   greedy one-token answers on the {len(HELD_OUT_DIGITS)} held-out digits (chance 0.1 / 0.5 / 0.5):")
    print("   accuracy " + ", ".join(f"{IMAGE_QUESTIONS[kind][0]!r} {value:.3f}" for kind, value in accuracy.items()))

    shown = list(HELD_OUT_DIGITS[:NUM_SHOWN])
    image_names = save_digit_images(data / "held_out", shown, IMAGE_SIZE)
    image_paths = [str(data / "held_out" / name) for name in image_names]
    truths = [DIGIT_NAMES[label] for label in digit_labels(shown)]
    question = IMAGE_QUESTIONS["digit"][0]
    answers = pipeline_answers(model_dir, image_paths, question)
    print(f"4. pipeline('image-text-to-text') asked {question!r} about the first {NUM_SHOWN} held-out digits:")
    for index, answer, truth in zip(shown, answers, truths):
        print(f"   digit {index}: {answer!r:9} (truth {truth!r}{'' if answer == truth else ', wrong'})")
    right = sum(answer == truth for answer, truth in zip(answers, truths))
    print(f"   {right}/{NUM_SHOWN} right")
    print("5. The same questions in a fresh Python process where hf_moe cannot be imported (as for a Hub user):")
    reloaded = run_as_hub_user(HUB_USER_SCRIPT, [model_dir, question, *image_paths], model_dir)
    agree = sum(a == b for a, b in zip(reloaded["answers"], answers))
    print(f"   loaded {reloaded['class']}; the same answer as in-process for {agree}/{NUM_SHOWN} digits")
    routing_dir = analyze_demo_routing(model_dir, data, images, output_dir / ROUTING_DIR)
    return {
        "model_dir": str(model_dir),
        "steps": {"base": base_steps, "stage1": stage1_steps, "stage2": stage2_steps},
        "num_held_out_images": len(HELD_OUT_DIGITS),
        "held_out_accuracy": accuracy,
        "question": question,
        "digit_indices": shown,
        "labels": truths,
        "answers": answers,
        "reloaded_answers": reloaded["answers"],
        "reloaded_class": reloaded["class"],
        "routing_dir": str(routing_dir),
    }


def analyze_demo_routing(model_dir: Path, data: Path, images: Path, routing_dir: Path) -> Path:
    """`hf-moe analyze-routing` of the trained MoIIE on held-out digit questions (every kind) and text-only
    questions; prints where the report went and the last MoE layer's shares."""
    from ..routing_report import RoutingArguments, write_routing_report
    from .routing import analyze_routing

    questions = save_digit_questions(
        data / "routing_questions.json",
        images,
        ROUTING_DIGITS,
        list(IMAGE_QUESTIONS),
        IMAGE_SIZE,
        text_only_per_kind=ROUTING_TEXT_ONLY_PER_KIND,
    )
    args = RoutingArguments(
        model=str(model_dir), data=str(questions), image_folder=str(images), output_dir=str(routing_dir), batch_size=64
    )
    report = analyze_routing(args, progress=False)
    write_routing_report(report, routing_dir, overwrite=True)
    last = report.numbers["layers"][-1]
    shares = ", ".join(
        f"{modality} tokens " + " / ".join(f"{share:.2f}" for share in last[f"{modality}_share"])
        for modality in ("vision", "language")
    )
    print(
        f"6. hf-moe analyze-routing on {report.num_samples} held-out questions -> {routing_dir / 'routing.md'}\n"
        f"   layer {last['layer']}, each expert's share ({' / '.join(report.numbers['expert_groups'])}): {shares}"
    )
    return routing_dir

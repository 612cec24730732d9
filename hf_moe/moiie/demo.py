"""MoIIE's step of `hf-moe demo`, offline on a CPU in under a minute:

1. a small SigLIP vision tower and a small Phi-3 with a word-level tokenizer, built locally;
2. upcycled into a MoIIE (1 vision, 2 shared, 1 language expert per MoE layer, top-2) with `upcycle_moiie`;
3. stage 1 (projector) and stage 2 (LLM + MoE) training with `hf-moe train-moiie`'s function on digit questions
   ("what digit is this ?", "is it even ?", "is it greater than four ?") about scikit-learn's digits;
4. an answer for a held-out digit from `pipeline("image-text-to-text", trust_remote_code=True)` on the saved folder;
5. the same question answered in a fresh Python process where hf_moe cannot be imported (as for a Hub user).

    hf-moe demo --family moiie [--output_dir outputs/demo]      (writes OUTPUT_DIR/moiie)

A few dozen steps teach this toy little: the demo shows the workflow, examples/moiie/experiment_digits.py measures.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor
from transformers.utils import logging

from ..conversion import upcycle_moiie
from ..experiments import quiet_tiny_run
from ..fileio import atomic_output_file
from ..toy_data import DIGIT_NAMES, digit_images_at
from .toy import (
    IMAGE_QUESTIONS,
    digit_labels,
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

# Runs in a fresh interpreter in which importing hf_moe fails: model and processor load from the folder's own code.
HUB_USER_SCRIPT = r"""
import importlib.abc, json, sys

class NoHfMoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_moe":
            raise ImportError("hf_moe is not installed for this user")

sys.meta_path.insert(0, NoHfMoe())
from PIL import Image
from transformers import pipeline

model_dir, image_path, question = sys.argv[1:]
pipe = pipeline("image-text-to-text", model=model_dir, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                         {"type": "text", "text": question}]}]
answer = pipe(text=messages, max_new_tokens=1, do_sample=False)[0]["generated_text"][-1]["content"]
print(json.dumps({"class": f"{type(pipe.model).__module__}.{type(pipe.model).__name__}", "answer": answer.strip()}))
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


def pipeline_answer(model_dir: Path, image_path: Path, question: str) -> str:
    """The `image-text-to-text` pipeline's greedy one-token answer, in this process."""
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(model_dir), trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": question}],
        }
    ]
    return pipe(text=messages, max_new_tokens=1, do_sample=False)[0]["generated_text"][-1]["content"].strip()


def run_demo(output_dir: str | Path, stage1_steps: int = 20, stage2_steps: int = 40, seed: int = 0) -> dict:
    """Run the MoIIE demo in `output_dir` (its sub-folders are recreated) and return its numbers."""
    with quiet_tiny_run():
        return _run_demo(Path(output_dir), stage1_steps, stage2_steps, seed)


def _run_demo(output_dir: Path, stage1_steps: int, stage2_steps: int, seed: int) -> dict:
    for name in ("parts", "data", "moiie-upcycled", "moiie-stage1", "moiie-stage2"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    print("MoIIE: a vision-language model whose MoE layers hold vision-only, shared and language-only experts")
    print("1. A small SigLIP vision tower and a small Phi-3 with a word-level tokenizer, built locally")
    processor = toy_processor()
    llm, vision = save_toy_parts(output_dir / "parts", processor, seed=seed)
    print("2. Upcycled into MoIIE: 1 vision / 2 shared / 1 language expert in the odd layers, top-2 (upcycle_moiie)")
    upcycled = output_dir / "moiie-upcycled"
    upcycle_moiie(llm, vision, upcycled, image_token_id=processor.image_token_id, seed=seed)
    images = output_dir / "data" / "images"
    stage1_data = save_digit_questions(output_dir / "data" / "stage1.json", images, TRAIN_DIGITS, ["digit"])
    stage2_data = save_digit_questions(output_dir / "data" / "stage2.json", images, TRAIN_DIGITS, list(IMAGE_QUESTIONS))
    print(
        f"3. hf-moe train-moiie: stage 1 ({stage1_steps} steps, projector), stage 2 ({stage2_steps} steps, LLM + MoE)"
    )
    training = dict(per_device_train_batch_size=32, learning_rate=1e-3, seed=seed, logging_strategy="no")
    stage1 = train_stage(
        upcycled, stage1_data, images, output_dir / "moiie-stage1", "pretrain", stage1_steps, **training
    )
    model_dir = train_stage(
        stage1, stage2_data, images, output_dir / "moiie-stage2", "finetune", stage2_steps, **training
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    evaluated = HELD_OUT_DIGITS[:100]
    accuracy = answer_accuracy(model, AutoProcessor.from_pretrained(model_dir), evaluated)
    print(
        f"   accuracy on {len(evaluated)} held-out digits (a workflow check; the experiment measures): "
        + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
    )

    index = HELD_OUT_DIGITS.start
    (image_name,) = save_digit_images(output_dir / "data" / "held_out", [index])
    image_path = output_dir / "data" / "held_out" / image_name
    question = IMAGE_QUESTIONS["digit"][0]
    answer = pipeline_answer(model_dir, image_path, question)
    print(
        f"4. pipeline('image-text-to-text') on held-out digit {index} (a {DIGIT_NAMES[digit_labels([index])[0]]}): "
        f"{question!r} -> {answer!r}"
    )
    print("5. The same question in a fresh Python process where hf_moe cannot be imported (as for a Hub user):")
    child = subprocess.run(
        [sys.executable, "-c", HUB_USER_SCRIPT, str(model_dir), str(image_path), question],
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        raise RuntimeError(f"Loading {model_dir} without hf_moe failed:\n{child.stderr}")
    reloaded = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"   loaded {reloaded['class']}; answer {reloaded['answer']!r} (in-process {answer!r})")
    result = {
        "model_dir": str(model_dir),
        "held_out_accuracy": accuracy,
        "question": question,
        "digit_index": index,
        "label": DIGIT_NAMES[digit_labels([index])[0]],
        "answer": answer,
        "reloaded_answer": reloaded["answer"],
        "reloaded_class": reloaded["class"],
    }
    with atomic_output_file(output_dir / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result

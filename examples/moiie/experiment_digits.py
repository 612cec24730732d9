"""MoIIE's claim on a CPU-sized problem: at equal training steps, do modality-aware experts (MoIIE: vision-only,
shared and language-only experts behind two routers) answer visual questions better than a dense LVLM, a vanilla
MoE (one router over all experts) and a modality MoE (one vision and one language expert, no router)?

Task: questions about scikit-learn's 8x8 handwritten digits (upscaled to 16 px): "what digit is this ?" (answer:
the digit's word), "is it even ?" and "is it greater than four ?" (yes / no). Digits 0-1499 train, 1500-1796 are
held out.

Per seed:

    dense base   a small SigLIP (hidden 64, 2 layers, 16 tokens per image) + a small Phi-3 (hidden 64, 4 layers) +
                 projector, trained end to end (`--base_steps`) on "what digit is this ?" about the training images
                 and on text-only questions ("is seven even ?"): the stand-in for the separately pretrained SigLIP
                 and LLM of the paper. Its vision tower and Phi-3 are then split off and the projector dropped.
    per variant  dense / vanilla (4 experts, top-2) / modality (1 vision + 1 language expert used) / moiie (1 vision,
                 2 shared, 1 language expert, top-2, the paper's N=4), upcycled from those parts with
                 `upcycle_moiie` (MoE in the odd decoder layers), then stage 1 (`--stage1_steps`, new projector
                 only, "what digit is this ?") and stage 2 (`--stage2_steps`, LLM + MoE + projector, all three
                 question kinds, balance losses), both through `train_moiie` (MoIIETrainer); the same steps, batch
                 and learning rate for every variant.

Reported on the 297 held-out digits, per question kind: accuracy of the greedy one-token answer (the first token
`generate(do_sample=False)` emits: the argmax over the whole vocabulary), mean +- sample std over seeds. For
vanilla and moiie, the routing picture on the held-out prompts: the share of top-k routing slots of vision tokens
and of language tokens that goes to each expert, per MoE layer and averaged over layers.

    python examples/moiie/experiment_digits.py --output examples/moiie/experiment_digits_results.json
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, HfArgumentParser

from hf_moe.conversion import upcycle_moiie
from hf_moe.experiments import experiment_workspace, format_mean_std, mean_std
from hf_moe.fileio import atomic_output_file
from hf_moe.modeling import expert_load
from hf_moe.moiie.demo import HELD_OUT_DIGITS, answer_accuracy, question_inputs, train_stage
from hf_moe.moiie.toy import IMAGE_QUESTIONS, save_dense_parts, save_digit_questions, save_toy_parts, toy_processor
from hf_moe.toy_data import digit_images_at


VARIANTS = {
    "dense": "dense",
    "vanilla": "vanilla MoE (4 experts, top-2)",
    "modality": "modality MoE (hard routing)",
    "moiie": "MoIIE (1 vision / 2 shared / 1 language, top-2)",
}
KINDS = {"digit": "what digit?", "even": "even?", "greater": "greater than four?", "mean": "mean"}
ROUTED = ("vanilla", "moiie")
IMAGE_SIZE = 16


@dataclass
class ExperimentArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One full run per seed."})
    output: str = field(default="experiment_digits.json", metadata={"help": "JSON file for the results."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Keep the models here (a new or empty folder); default: a temporary one."}
    )
    train_images: int = field(default=1500, metadata={"help": "Training digits: the first N (at most 1500)."})
    eval_images: int = field(default=297, metadata={"help": "Held-out digits evaluated: the first N of the 297."})
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of the SigLIP and the Phi-3."})
    text_only_questions: int = field(
        default=1500, metadata={"help": "Text-only questions per kind (even, greater) in the dense base's data."}
    )
    base_steps: int = field(default=250, metadata={"help": "Steps of the dense base's end-to-end training."})
    stage1_steps: int = field(default=50, metadata={"help": "Stage 1 (projector) steps of every variant."})
    stage2_steps: int = field(default=150, metadata={"help": "Stage 2 (LLM + MoE) steps of every variant."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of every training run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of every training run."})
    quick: bool = field(default=False, metadata={"help": "A seconds-long smoke run (tiny data, steps and model)."})

    def __post_init__(self):
        if self.quick:
            self.train_images, self.eval_images, self.hidden_size, self.text_only_questions = 40, 20, 32, 20
            self.base_steps, self.stage1_steps, self.stage2_steps, self.batch_size = 2, 1, 2, 8
        if not self.seeds:
            raise ValueError("Give at least one seed.")
        if not 1 <= self.train_images <= HELD_OUT_DIGITS.start:
            raise ValueError(f"train_images must be between 1 and {HELD_OUT_DIGITS.start} (the rest is held out).")
        if not 1 <= self.eval_images <= len(HELD_OUT_DIGITS):
            raise ValueError(f"eval_images must be between 1 and {len(HELD_OUT_DIGITS)}.")


@torch.no_grad()
def routing_shares(model, processor, indices) -> dict[str, list[list[float]]]:
    """Per modality, `(num_moe_layers, num_experts)` shares of the top-k routing slots of the held-out prompts'
    vision / language tokens (global expert indices; each row sums to 1)."""
    config = model.config
    images = digit_images_at(indices, IMAGE_SIZE)
    # every question kind once per image, so the language tokens of all three prompts are counted
    kinds = [kind for kind in IMAGE_QUESTIONS for _ in images]
    inputs = question_inputs(processor, images * len(IMAGE_QUESTIONS), kinds)
    outputs = model.eval()(**inputs, output_router_logits=True)
    valid = inputs["attention_mask"].bool()
    masks = {"vision": valid & (inputs["token_type_ids"] == 1), "language": valid & (inputs["token_type_ids"] == 0)}
    # Each modality's router logits (the output names them); under "moiie" the language router's experts start
    # after the vision-only ones (experts are packed [vision..., shared..., language...]).
    offsets = {"vision": 0, "language": config.num_vision_experts if config.variant == "moiie" else 0}
    routers = {modality: (getattr(outputs, f"{modality}_router_logits"), offsets[modality]) for modality in masks}
    shares = {}
    for modality, (logits, offset) in routers.items():
        loads = expert_load(logits, config.num_experts_per_tok, masks[modality])
        full = loads.new_zeros(loads.shape[0], config.num_local_experts)
        full[:, offset : offset + loads.shape[1]] = loads
        shares[modality] = full.tolist()
    return shares


def run_seed(args: ExperimentArguments, seed: int, root: Path, data: dict[str, Path]) -> dict[str, dict]:
    processor = toy_processor(image_size=IMAGE_SIZE)
    image_token_id = processor.image_token_id
    size = dict(vision_hidden_size=args.hidden_size, text_hidden_size=args.hidden_size)
    llm, vision = save_toy_parts(root / "init", processor, seed=seed, **size)
    training = dict(per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed)
    upcycle_moiie(llm, vision, root / "base-init", variant="dense", image_token_id=image_token_id, seed=seed)
    base = train_stage(
        root / "base-init",
        data["base"],
        data["images"],
        root / "base",
        "finetune",
        args.base_steps,
        train_vision_tower=True,
        **training,
    )
    llm, vision = save_dense_parts(base, root / "parts")
    held_out = list(HELD_OUT_DIGITS)[: args.eval_images]
    results = {}
    for variant in VARIANTS:
        upcycled = root / variant / "upcycled"
        upcycle_moiie(llm, vision, upcycled, variant=variant, image_token_id=image_token_id, seed=seed)
        stage1 = train_stage(
            upcycled,
            data["stage1"],
            data["images"],
            root / variant / "stage1",
            "pretrain",
            args.stage1_steps,
            **training,
        )
        stage2 = train_stage(
            stage1, data["stage2"], data["images"], root / variant / "stage2", "finetune", args.stage2_steps, **training
        )
        model = AutoModelForCausalLM.from_pretrained(stage2)
        processor = AutoProcessor.from_pretrained(stage2)
        accuracy = answer_accuracy(model, processor, held_out, IMAGE_SIZE)
        accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
        results[variant] = {"accuracy": accuracy}
        if variant in ROUTED:
            results[variant]["routing"] = routing_shares(model, processor, held_out)
        print(f"   seed {seed} {VARIANTS[variant]}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return results


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Accuracy per variant and question kind, and the routing shares averaged over layers, as mean and sample
    std over seeds."""
    runs = list(per_seed.values())
    summary = {"accuracy": {}, "routing": {}}
    for variant in VARIANTS:
        summary["accuracy"][variant] = {
            kind: mean_std([run[variant]["accuracy"][kind] for run in runs]) for kind in KINDS
        }
    for variant in ROUTED:
        summary["routing"][variant] = {}
        for modality in ("vision", "language"):
            layer_means = [
                [sum(column) / len(column) for column in zip(*run[variant]["routing"][modality])] for run in runs
            ]
            summary["routing"][variant][modality] = [mean_std(list(values)) for values in zip(*layer_means)]
    return summary


def markdown_tables(summary: dict) -> str:
    rows = [
        "| variant | " + " | ".join(KINDS.values()) + " |",
        "| --- | " + " | ".join("---" for _ in KINDS) + " |",
    ]
    for variant, name in VARIANTS.items():
        rows.append(
            f"| {name} | " + " | ".join(format_mean_std(summary["accuracy"][variant][kind]) for kind in KINDS) + " |"
        )
    num_experts = len(summary["routing"][ROUTED[0]]["vision"])
    rows += [
        "",
        "| routing share (mean over MoE layers) | " + " | ".join(f"expert {e}" for e in range(num_experts)) + " |",
        "| --- | " + " | ".join("---" for _ in range(num_experts)) + " |",
    ]
    for variant in ROUTED:
        for modality, shares in summary["routing"][variant].items():
            rows.append(f"| {variant}, {modality} tokens | " + " | ".join(format_mean_std(s) for s in shares) + " |")
    return "\n".join(rows)


def build_data(args: ExperimentArguments, folder: Path) -> dict[str, Path]:
    train = range(args.train_images)
    images = folder / "images"
    return {
        "images": images,
        "base": save_digit_questions(
            folder / "base.json", images, train, ["digit"], IMAGE_SIZE, text_only_per_kind=args.text_only_questions
        ),
        "stage1": save_digit_questions(folder / "stage1.json", images, train, ["digit"], IMAGE_SIZE),
        "stage2": save_digit_questions(folder / "stage2.json", images, train, list(IMAGE_QUESTIONS), IMAGE_SIZE),
    }


def run_experiment(args: ExperimentArguments) -> dict:
    started = time.perf_counter()
    with experiment_workspace(args.work_dir, prefix="experiment_moiie_") as work_dir:
        data = build_data(args, work_dir / "data")
        per_seed = {}
        for seed in args.seeds:
            print(f"Seed {seed}")
            per_seed[seed] = run_seed(args, seed, work_dir / f"seed{seed}", data)
    summary = summarize(per_seed)
    result = {
        "settings": {key: value for key, value in asdict(args).items() if key not in ("output", "work_dir")},
        "evaluation": "greedy one-token answer (argmax over the whole vocabulary after the generation prompt)",
        "routing": "share of top-k routing slots per expert on the held-out prompts, experts [vision, shared, "
        "shared, language] (moiie) or 4 interchangeable experts (vanilla)",
        "num_held_out_images": args.eval_images,
        "variants": VARIANTS,
        "per_seed": {str(seed): runs for seed, runs in per_seed.items()},
        "summary": summary,
        "table": markdown_tables(summary),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_output_file(args.output) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ExperimentArguments).parse_args_into_dataclasses(argv)
    result = run_experiment(args)
    print(result["table"])
    print(f"Results written to {args.output} ({result['runtime_seconds']} s)")
    return result


if __name__ == "__main__":
    main()

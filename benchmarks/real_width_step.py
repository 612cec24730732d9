# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""One training step per family at the papers' real widths, through each family's own Trainer, on CPU in bf16.

Tiny test models hide dtype, shape and memory faults that only real hidden sizes and vocabularies show. Each run
builds a randomly initialised model at the real widths and vocabulary, depth cut to `--layers` (2) blocks per
tower or decoder, directly in `--param_dtype` (bfloat16), and trains it for `--warmup` + `--steps` optimizer steps
through the family's Trainer (`bf16=True`, `use_cpu=True`, `report_to="none"`, nothing saved), with the recipe's
optimizer and peak learning rate held constant from the first step (no warm-up, constant schedule, so that every
measured step applies a recipe-sized update):

* `clip_moe/router`: CLIP-MoE router training (`CLIPMoETrainer`, `CLIPMoERouterTrainingArguments`) of a CLIP-MoE at
  CLIP ViT-L/14 widths (vision 1024 / 4096, 16 heads, patch 14, image 224; text 768 / 3072, 12 heads, vocabulary
  49408, Long-CLIP's 248 positions; projection 768), every block 4 experts top-2, routers only;
* `clip_moe/mcl`: one MCL stage (`MCLStageTrainer`, `MCLTrainingArguments`): the dense L/14, MLPs only;
* `mode/expert`: a MoDE data expert (`hf_moe.mode.train_expert.DataExpertTrainer`): the whole CLIP ViT-B/32
  (vision 768 / 3072, 12 heads, patch 32; text 512 / 2048, 8 heads, vocabulary 49408, 77 positions; projection 512);
* `we_moe/tta`, `we_moe/e_wemoe_tta`: WEMoE / E-WEMoE test-time adaptation (`TTATrainer`) of a ViT-B/32 WEMoE with
  8 task vectors (E-WEMoE: one shared router, task vectors pruned to 10 %), routers only, one batch of each of the
  paper's 8 tasks per step with random zero-shot heads of their real class counts;
* `we_moe/adamerging`: layer-wise AdaMerging (`AdaMergingCLIP` through `TTATrainer`) of 8 B/32 task vectors;
* `moiie/stage2`, `moiie/stage1`: MoIIE (`MoIIETrainer`) at Phi-3-mini widths (3072 / 8192, 32 heads, vocabulary
  32064) with SigLIP-so400m's tower (1152 / 4304, 16 heads, patch 14, image 384: 729 tokens), 2 decoder layers of
  which layer 1 is MoE (1 vision + 2 shared + 1 language experts, top-2); stage 2 trains LLM + projector, stage 1
  the projector; LLaVA conversations with one image each through `MoIIECollator`.

Per run (each in a FRESH worker process, one after the other, so that runs do not share a peak): seconds per
measured step (from the Trainer's step begin to its step end, batches already collated, the checks below not
counted), peak resident memory of the worker (VmHWM, the whole run: build + steps), trainable and
total parameters, every logged loss, and the checks, which make `ok` false (and the exit status 1) when they fail:

* every loss finite; every trained parameter's gradient finite before each optimizer step, and its values finite
  after it (so the update is finite);
* balance losses within their range: the Mixtral / Switch form `E * sum_e f_e P_e` lies in [top_k, E] for E
  experts (= top_k when balanced): CLIP-MoE per tower [2, 4]; MoIIE per modality, each router reaching 3 experts,
  [2, 3];
* WEMoE / AdaMerging: each task's mean entropy within [0, log(num_classes)].

Reported, not checked: the share of (sampled) trained entries that an optimizer step changed. With bf16 weights
and no fp32 master copy, an update smaller than half a bf16 step (2^-9 of the value) rounds away.

One JSON object goes to stdout (and `--output`), progress to stderr; exit status 1 when a run fails its checks:

    python benchmarks/real_width_step.py --output benchmarks/results/real_width_step_cpu.json   # every run
    python benchmarks/real_width_step.py --families moiie --warmup 0 --steps 1 \
        --output benchmarks/results/real_width_step_cpu.json --update     # re-measure MoIIE only, keep the others
    python benchmarks/real_width_step.py --tiny --in_process                                    # seconds: smoke test

On a CPU without bf16 instructions (no AVX512-BF16 / AMX) bf16 matrix products take a slow generic path: a CLIP
L/14 step takes minutes and a MoIIE step at Phi-3-mini width (~1,000 tokens) tens of minutes there.
"""

import argparse
import contextlib
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


# This script's folder is on sys.path when it runs as a script, not when a test loads it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import current_rss_mib, log, peak_rss_mib, report_header, run_worker, write_report  # noqa: E402


SEED = 0
RUNS = (
    "clip_moe/router",
    "clip_moe/mcl",
    "mode/expert",
    "we_moe/tta",
    "we_moe/e_wemoe_tta",
    "we_moe/adamerging",
    "moiie/stage2",
    "moiie/stage1",
)
FAMILIES = tuple(dict.fromkeys(run.split("/")[0] for run in RUNS))
# The WEMoE paper's eight tasks and their class counts (for the random zero-shot heads' sizes).
TASK_CLASSES = {
    "sun397": 397,
    "stanford_cars": 196,
    "resisc45": 45,
    "eurosat": 10,
    "svhn": 10,
    "gtsrb": 43,
    "mnist": 10,
    "dtd": 47,
}
SAMPLED_ENTRIES = 4096  # per trained tensor, for the share of entries an optimizer step changes

# ---------------------------------------------------------------------------------------------------------------
# Real widths (written by hand from the checkpoints' config.json: no Hub access) and the tiny stand-ins
# ---------------------------------------------------------------------------------------------------------------

CLIP_L14 = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, patch_size=14, image_size=224),
    "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, vocab_size=49408),
    "projection_dim": 768,
}
CLIP_B32 = {
    "vision": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=32, image_size=224),
    "text": dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, vocab_size=49408),
    "projection_dim": 512,
}
CLIP_TINY = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=8, image_size=32),
    "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=49408),
    "projection_dim": 16,
}
# microsoft/Phi-3-mini-4k-instruct
PHI3_MINI = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)
PHI3_TINY = dict(PHI3_MINI, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
# google/siglip-so400m-patch14-384 (vision tower)
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    patch_size=14,
    image_size=384,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
SIGLIP_TINY = dict(
    SIGLIP_SO400M, hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=8, image_size=32
)


def clip_shape(args, name: str) -> dict:
    return CLIP_TINY if args.tiny else {"l14": CLIP_L14, "b32": CLIP_B32}[name]


def clip_config_kwargs(shape: dict, layers: int, text_positions: int) -> dict:
    text = dict(
        shape["text"],
        num_hidden_layers=layers,
        max_position_embeddings=text_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )
    vision = dict(shape["vision"], num_hidden_layers=layers, hidden_act="quick_gelu")
    return dict(text_config=text, vision_config=vision, projection_dim=shape["projection_dim"])


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(1000)]


def random_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sentence(words: int, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (words,), generator=generator).tolist())


def clip_processor(image_size: int, text_positions: int):
    """A CLIP processor resizing to `image_size`, with a byte-level BPE tokenizer in which each of `WORDS` is one
    token (ids within CLIP's 49408), truncating at `text_positions`."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from hf_moe.toy import toy_clip_tokenizer

    tokenizer = toy_clip_tokenizer(WORDS)
    tokenizer.model_max_length = text_positions
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def image_caption_rows(count: int, image_size: int, words: int) -> list[dict]:
    """`count` image-caption rows (random images, captions of `words` words: longer than the text positions, so
    every caption fills them)."""
    return [{"image": random_image(image_size, SEED + i), "text": sentence(words, SEED + i)} for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# The checks: a callback that times each step and checks gradients and updates
# ---------------------------------------------------------------------------------------------------------------


class StepProbe(TrainerCallback):
    """Times each optimizer step (step begin -> step end, minus this probe's own checks), checks every trained
    parameter's gradient before the optimizer step and its values after it, and measures on a fixed sample of each
    trained tensor's entries the share that the step changed and the largest change."""

    def __init__(self, model):
        self.parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(SEED)
        self.samples = [
            torch.randint(p.numel(), (min(SAMPLED_ENTRIES, p.numel()),), generator=generator)
            for _, p in self.parameters
        ]
        self.steps, self.logs = [], []
        self._begin = self._overhead = 0.0
        self._before = None
        self._step = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self._overhead = 0.0
        self._step = {}
        self._begin = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        start = time.perf_counter()
        nonfinite, missing, squares = [], [], 0.0
        for name, parameter in self.parameters:
            grad = parameter.grad
            if grad is None:
                missing.append(name)
                continue
            if not torch.isfinite(grad).all():
                nonfinite.append(name)
            squares += grad.float().pow(2).sum().item()
        self._before = [p.detach().reshape(-1)[index].float() for (_, p), index in zip(self.parameters, self.samples)]
        self._step.update(
            grad_norm=math.sqrt(squares),
            grads_nonfinite=nonfinite,
            params_without_grad=missing,
        )
        self._overhead += time.perf_counter() - start

    def on_optimizer_step(self, args, state, control, **kwargs):
        start = time.perf_counter()
        nonfinite, changed, total, largest = [], 0, 0, 0.0
        for (name, parameter), index, before in zip(self.parameters, self.samples, self._before):
            if not torch.isfinite(parameter.detach()).all():
                nonfinite.append(name)
            delta = parameter.detach().reshape(-1)[index].float() - before
            changed += int((delta != 0).sum())
            total += delta.numel()
            largest = max(largest, float(delta.abs().max()))
        self._before = None
        self._step.update(
            params_nonfinite_after_step=nonfinite,
            sampled_entries_changed=changed / max(total, 1),
            max_sampled_update=largest,
        )
        self._overhead += time.perf_counter() - start

    def on_step_end(self, args, state, control, **kwargs):
        self._step["seconds"] = time.perf_counter() - self._begin - self._overhead
        self._step["rss_mib"] = current_rss_mib()
        self.steps.append(self._step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def common_training_kwargs(args, output_dir: str, batch_size: int) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=batch_size,
        bf16=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log, not be replaced by the running mean
        disable_tqdm=True,
        dataloader_num_workers=0,
        warmup_steps=0,
        lr_scheduler_type="constant",
        seed=SEED,
    )


# ---------------------------------------------------------------------------------------------------------------
# The runs: each returns (trainer, description, checks of its logged losses)
# ---------------------------------------------------------------------------------------------------------------


def balance_check(name: str, value: float, top_k: int, num_experts: int) -> dict:
    # The Mixtral / Switch balance loss E * sum_e f_e P_e: top_k when balanced, at most E (all probability on the
    # k chosen experts); a small tolerance for the fp32 sums.
    low, high = top_k * (1 - 1e-4), num_experts * (1 + 1e-4)
    return {"name": name, "value": value, "range": [top_k, num_experts], "ok": low <= value <= high}


def entropy_check(name: str, value: float, num_classes: int) -> dict:
    high = math.log(num_classes)
    return {"name": name, "value": value, "range": [0.0, high], "ok": -1e-4 <= value <= high + 1e-4}


def finite_check(name: str, value: float) -> dict:
    return {"name": name, "value": value, "ok": value is not None and math.isfinite(value)}


def build(cls, config, dtype):
    """`cls(config)` with its random weights created directly in `dtype` (no fp32 copy at real width)."""
    torch.manual_seed(SEED)
    return cls._from_config(config, dtype=dtype)


def run_clip_moe_router(args, output_dir, dtype):
    from hf_moe.clip_moe.trainer import CLIPMoERouterTrainingArguments, CLIPMoETrainer
    from hf_moe.data import ImageTextCollator
    from hf_moe.modeling import CLIPMoEConfig, CLIPMoEModel, load_balancing_loss

    shape = clip_shape(args, "l14")
    config = CLIPMoEConfig(
        **clip_config_kwargs(shape, args.layers, 77),
        num_local_experts=4,
        num_experts_per_tok=2,
        long_text=True,  # Long-CLIP: 248 text positions
        expert_dropout=0.1,  # hf-moe train-router's default
    )
    config.text_config.router_aux_loss_coef = 0.005  # the CLIP-MoE release's text weight; vision keeps 0.01
    model = build(CLIPMoEModel, config, dtype)

    class Trainer(CLIPMoETrainer):
        """Also records each tower's balance loss (the model reports their sum)."""

        def _additional_loss(self, model, inputs, outputs, record):
            if record:
                with torch.no_grad():
                    for tower, tower_config, logits, mask in (
                        ("vision", config.vision_config, outputs.vision_router_logits, None),
                        ("text", config.text_config, outputs.text_router_logits, inputs.get("attention_mask")),
                    ):
                        balance = load_balancing_loss(
                            logits, tower_config.num_local_experts, tower_config.num_experts_per_tok, mask
                        )
                        self._record(f"{tower}_balance_loss", balance)
            return super()._additional_loss(model, inputs, outputs, record)

    image_size = shape["vision"]["image_size"]
    processor = clip_processor(image_size, config.text_config.max_position_embeddings)
    training_args = CLIPMoERouterTrainingArguments(
        **common_training_kwargs(args, output_dir, args.batch_size), log_expert_load="none"
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=image_caption_rows(args.batch_size, image_size, 300),
        data_collator=ImageTextCollator(processor),
    )

    def checks(logs):
        out = []
        for entry in logs:
            out.append(finite_check("contrastive_loss", entry.get("contrastive_loss")))
            for tower in ("vision", "text"):
                out.append(balance_check(f"{tower}_balance_loss", entry.get(f"{tower}_balance_loss", math.nan), 2, 4))
        return out

    description = {
        "shape": "CLIP ViT-L/14 widths, Long-CLIP text (248 positions), 4 experts top-2 in every block",
        "config": {"vision": shape["vision"], "text": {**shape["text"], "max_position_embeddings": 248}},
        "trainer": "CLIPMoETrainer + CLIPMoERouterTrainingArguments (routers only)",
        "batch": f"{args.batch_size} images + captions of 248 tokens",
    }
    return trainer, description, checks


def run_clip_moe_mcl(args, output_dir, dtype):
    from transformers import CLIPConfig, CLIPModel

    from hf_moe.clip_moe.mcl import MCLStageTrainer
    from hf_moe.clip_moe.trainer import MCLTrainingArguments
    from hf_moe.data import ImageTextCollator

    shape = clip_shape(args, "l14")
    config = CLIPConfig(**clip_config_kwargs(shape, args.layers, 248))  # the Long-CLIP base MCL starts from
    model = build(CLIPModel, config, dtype)
    image_size = shape["vision"]["image_size"]
    processor = clip_processor(image_size, 248)
    rows = image_caption_rows(args.batch_size, image_size, 300)
    trainer = MCLStageTrainer(
        model=model,
        args=MCLTrainingArguments(**common_training_kwargs(args, output_dir, args.batch_size)),
        train_dataset=rows,
        data_collator=ImageTextCollator(processor),
        cluster_labels=torch.zeros(len(rows), dtype=torch.long),  # one cluster: every batch from it
    )

    def checks(logs):
        return [finite_check("contrastive_loss", entry.get("contrastive_loss")) for entry in logs]

    description = {
        "shape": "dense CLIP ViT-L/14 widths, Long-CLIP text (248 positions)",
        "config": {"vision": shape["vision"], "text": {**shape["text"], "max_position_embeddings": 248}},
        "trainer": "MCLStageTrainer (CLIPMoETrainer) + MCLTrainingArguments (MLPs only)",
        "batch": f"{args.batch_size} images + captions of 248 tokens, one cluster",
    }
    return trainer, description, checks


def run_mode_expert(args, output_dir, dtype):
    from transformers import CLIPConfig, CLIPModel

    from hf_moe.data import ImageTextCollator
    from hf_moe.mode.train_expert import DataExpertTrainer, DataExpertTrainingArguments

    shape = clip_shape(args, "b32")
    config = CLIPConfig(**clip_config_kwargs(shape, args.layers, 77))
    model = build(CLIPModel, config, dtype)
    image_size = shape["vision"]["image_size"]
    trainer = DataExpertTrainer(
        model=model,
        args=DataExpertTrainingArguments(**common_training_kwargs(args, output_dir, args.batch_size)),
        train_dataset=image_caption_rows(args.batch_size, image_size, 100),
        data_collator=ImageTextCollator(clip_processor(image_size, 77)),
    )

    def checks(logs):
        return [finite_check("contrastive_loss", entry.get("contrastive_loss")) for entry in logs]

    description = {
        "shape": "CLIP ViT-B/32 widths (77 text positions)",
        "config": {"vision": shape["vision"], "text": {**shape["text"], "max_position_embeddings": 77}},
        "trainer": "DataExpertTrainer (CLIPTrainer) + DataExpertTrainingArguments (every parameter)",
        "batch": f"{args.batch_size} images + captions of 77 tokens",
    }
    return trainer, description, checks


def tta_data(args, image_size: int, projection_dim: int):
    """Random zero-shot heads of the 8 tasks' class counts, and `TaskBatches` over random images per task."""
    import datasets
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from hf_moe.we_moe.tta import TaskBatches

    generator = torch.Generator().manual_seed(SEED + 1)
    heads = {
        task: torch.nn.functional.normalize(torch.randn(classes, projection_dim, generator=generator), dim=-1)
        for task, classes in TASK_CLASSES.items()
    }
    tasks = {
        task: datasets.Dataset.from_dict(
            {"image": [random_image(image_size, 100 * t + i) for i in range(args.tta_batch_size)]}
        ).cast_column("image", datasets.Image())
        for t, task in enumerate(TASK_CLASSES)
    }
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    dataset = TaskBatches(tasks, processor, args.tta_batch_size, args.warmup + args.steps, seed=SEED)
    return heads, dataset


def entropy_checks(logs):
    out = []
    for entry in logs:
        for task, classes in TASK_CLASSES.items():
            out.append(entropy_check(f"entropy/{task}", entry.get(f"entropy/{task}", math.nan), classes))
    return out


@torch.no_grad()
def random_task_vectors(parameters: dict[str, torch.Tensor], num_tasks: int) -> list[dict[str, torch.Tensor]]:
    """Per task, {key: random tensor} with 0.1 x each parameter's spread (biases 0.01): fine-tunes' distance."""
    generator = torch.Generator().manual_seed(SEED + 2)
    vectors = []
    for _ in range(num_tasks):
        vector = {}
        for key, value in parameters.items():
            std = 0.1 * value.float().std().item() if value.dim() > 1 else 0.01
            vector[key] = (torch.randn(value.shape, generator=generator) * std).to(value.dtype)
        vectors.append(vector)
    return vectors


def run_we_moe(args, output_dir, dtype, e_wemoe: bool):
    from hf_moe.modeling import WEMoECLIPModel, WEMoEConfig
    from hf_moe.we_moe.tta import TTATrainer, TTATrainingArguments

    shape = clip_shape(args, "b32")
    kwargs = clip_config_kwargs(shape, args.layers, 77)
    extra = dict(shared_router=True, task_vector_format="pruned", prune_ratio=0.9) if e_wemoe else {}
    kwargs["vision_config"] = dict(kwargs["vision_config"], num_tasks=len(TASK_CLASSES), router_depth=2, **extra)
    model = build(WEMoECLIPModel, WEMoEConfig(**kwargs), dtype)
    # The pretrained MLPs are the random ones; the task vectors random (a fresh model's are zero, which would give
    # the routers no gradient).
    vision = model.vision_model
    mlps = {key: value for key, value in vision.state_dict().items() if re.search(r"\.mlp\.fc[12]\.", key)}
    model.load_task_vectors(mlps, random_task_vectors(mlps, len(TASK_CLASSES)))
    image_size = shape["vision"]["image_size"]
    heads, dataset = tta_data(args, image_size, shape["projection_dim"])
    training_args = TTATrainingArguments(**common_training_kwargs(args, output_dir, args.tta_batch_size))
    trainer = TTATrainer(model=model, args=training_args, train_dataset=dataset, heads=heads)
    kind = "E-WEMoE (shared router, task vectors pruned to 10 %)" if e_wemoe else "WEMoE (a router per block)"
    description = {
        "shape": f"CLIP ViT-B/32 widths, {kind}, 8 task vectors, depth-2 routers",
        "config": {"vision": shape["vision"], "text": shape["text"]},
        "trainer": "TTATrainer + TTATrainingArguments (routers only)",
        "batch": f"{args.tta_batch_size} images of each of the 8 tasks ({', '.join(TASK_CLASSES)})",
    }
    return trainer, description, entropy_checks


def run_adamerging(args, output_dir, dtype):
    from transformers import CLIPConfig, CLIPModel

    from hf_moe.we_moe.adamerging import AdaMergingCLIP
    from hf_moe.we_moe.tta import TTATrainer, TTATrainingArguments

    shape = clip_shape(args, "b32")
    model = build(CLIPModel, CLIPConfig(**clip_config_kwargs(shape, args.layers, 77)), dtype)
    parameters = {key: value.detach() for key, value in model.vision_model.named_parameters()}
    wrapper = AdaMergingCLIP(model, random_task_vectors(parameters, len(TASK_CLASSES)))
    heads, dataset = tta_data(args, shape["vision"]["image_size"], shape["projection_dim"])
    training_args = TTATrainingArguments(
        **common_training_kwargs(args, output_dir, args.tta_batch_size), trainable_parameters=[r"^merge_coefficients$"]
    )
    trainer = TTATrainer(model=wrapper, args=training_args, train_dataset=dataset, heads=heads)
    description = {
        "shape": "CLIP ViT-B/32 widths, layer-wise AdaMerging of 8 task vectors (a coefficient per tensor and task)",
        "config": {"vision": shape["vision"], "text": shape["text"]},
        "trainer": "TTATrainer + TTATrainingArguments (merge_coefficients only)",
        "batch": f"{args.tta_batch_size} images of each of the 8 tasks",
    }
    return trainer, description, entropy_checks


def run_moiie(args, output_dir, dtype, stage: str):
    from transformers import Phi3Config, SiglipVisionConfig

    from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM
    from hf_moe.moiie import toy
    from hf_moe.moiie.data import MoIIECollator, load_conversations
    from hf_moe.moiie.trainer import MoIIETrainer, MoIIETrainingArguments

    vision_shape, text_shape = (SIGLIP_TINY, PHI3_TINY) if args.tiny else (SIGLIP_SO400M, PHI3_MINI)
    image_size, patch = vision_shape["image_size"], vision_shape["patch_size"]
    processor = toy.toy_processor(WORDS, image_size=image_size, patch_size=patch)
    tokenizer = processor.tokenizer
    vision = SiglipVisionConfig(**vision_shape, num_hidden_layers=args.layers)
    text = Phi3Config(
        **text_shape,
        num_hidden_layers=args.layers,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = MoIIEConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=processor.image_token_id,
        num_vision_experts=1,
        num_shared_experts=2,
        num_language_experts=1,
        num_experts_per_tok=2,
    )
    model = build(MoIIEPhi3ForCausalLM, config, dtype)
    # LLaVA conversations, one image each: a question and an answer of `--text_tokens` / 2 words each.
    folder = Path(output_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    half = max(1, args.text_tokens // 2)
    samples = []
    for i in range(args.conversations):
        random_image(image_size, SEED + i).save(folder / f"{i}.png")
        samples.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\n" + sentence(half, 2 * i)},
                    {"from": "gpt", "value": sentence(half, 2 * i + 1)},
                ],
            }
        )
    (folder / "data.json").write_text(json.dumps(samples))
    dataset = load_conversations(folder / "data.json", folder)
    training_args = MoIIETrainingArguments(
        **common_training_kwargs(args, output_dir, args.conversations), stage=stage, log_expert_load="none"
    )
    trainer = MoIIETrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=MoIIECollator(processor)
    )
    sample = MoIIECollator(processor)([dataset[0]])

    def checks(logs):
        out = []
        for entry in logs:
            out.append(finite_check("lm_loss", entry.get("lm_loss")))
            # Each router reaches 3 experts (vision: 1 vision + 2 shared; language: 2 shared + 1 language), top-2.
            for name in ("vision_aux_loss", "language_aux_loss"):
                out.append(balance_check(name, entry.get(name, math.nan), 2, 3))
        return out

    trained = "projector only" if stage == "pretrain" else "LLM (MoE layer included) + projector"
    description = {
        "shape": "Phi-3-mini widths + SigLIP-so400m-patch14-384 tower, decoder layer 1 MoE (1 vision + 2 shared + "
        "1 language experts, top-2)",
        "config": {"text": text_shape, "vision": vision_shape, "image_tokens": processor.num_image_tokens},
        "trainer": f"MoIIETrainer + MoIIETrainingArguments(stage={stage!r}): {trained}",
        "batch": f"{args.conversations} conversation(s) of {sample['input_ids'].shape[1]} tokens "
        f"({processor.num_image_tokens} image tokens), one image each",
    }
    return trainer, description, checks


BUILDERS = {
    "clip_moe/router": run_clip_moe_router,
    "clip_moe/mcl": run_clip_moe_mcl,
    "mode/expert": run_mode_expert,
    "we_moe/tta": lambda args, out, dtype: run_we_moe(args, out, dtype, e_wemoe=False),
    "we_moe/e_wemoe_tta": lambda args, out, dtype: run_we_moe(args, out, dtype, e_wemoe=True),
    "we_moe/adamerging": run_adamerging,
    "moiie/stage2": lambda args, out, dtype: run_moiie(args, out, dtype, "finetune"),
    "moiie/stage1": lambda args, out, dtype: run_moiie(args, out, dtype, "pretrain"),
}


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def measure(run: str, args) -> dict:
    """Build run `run`'s model and Trainer, train `--warmup` + `--steps` steps, and return its figures and checks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.param_dtype)
    rss_start = current_rss_mib()
    # The Trainer prints its logs (disable_tqdm): they go to stderr, so that stdout holds the JSON only.
    with tempfile.TemporaryDirectory(prefix="real_width_step_") as output_dir, contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        trainer, description, loss_checks = BUILDERS[run](args, output_dir, dtype)
        build_seconds = time.perf_counter() - start
        model = trainer.model
        probe = StepProbe(model)
        trainer.add_callback(probe)
        rss_built = current_rss_mib()
        trainer.train()
    parameters = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    total = sum(p.numel() for p in parameters)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in parameters if p.requires_grad})
    measured = probe.steps[args.warmup :]
    checks = [finite_check("loss", entry.get("loss")) for entry in probe.logs]
    checks += loss_checks(probe.logs)
    for index, step in enumerate(probe.steps):
        checks.append(
            {
                "name": f"step {index + 1}: gradients finite",
                "ok": not step["grads_nonfinite"],
                "nonfinite": step["grads_nonfinite"][:5],
            }
        )
        checks.append(
            {
                "name": f"step {index + 1}: parameters finite after the update",
                "ok": not step["params_nonfinite_after_step"],
                "nonfinite": step["params_nonfinite_after_step"][:5],
            }
        )
    if len(probe.steps) != args.warmup + args.steps or len(probe.logs) != len(probe.steps):
        checks.append({"name": "every step ran and logged", "ok": False, "steps": len(probe.steps)})
    failed = [check for check in checks if not check["ok"]]
    losses = {
        key: [entry.get(key) for entry in probe.logs]
        for key in dict.fromkeys(k for entry in probe.logs for k in entry)
        if key not in ("epoch", "learning_rate", "grad_norm")
    }
    seconds = [step["seconds"] for step in measured]
    return {
        **description,
        "param_dtype": args.param_dtype,
        "trainable_param_dtypes": dtypes,
        "learning_rate": trainer.args.learning_rate,
        "optimizer": trainer.args.optim if isinstance(trainer.args.optim, str) else str(trainer.args.optim),
        "parameters": {"trainable": trainable, "total": total},
        "s_per_step": statistics.median(seconds) if seconds else None,
        "s_all_steps": [step["seconds"] for step in probe.steps],
        "s_build": build_seconds,
        "memory_mib": {
            "peak_rss": peak_rss_mib(),
            "rss_at_start": rss_start,
            "rss_after_build": rss_built,
            "rss_after_each_step": [step["rss_mib"] for step in probe.steps],
        },
        "losses": losses,
        "grad_norm": [step["grad_norm"] for step in probe.steps],
        "params_without_grad": sorted({name for step in probe.steps for name in step["params_without_grad"]})[:10],
        "sampled_entries_changed_per_step": [step["sampled_entries_changed"] for step in probe.steps],
        "max_sampled_update_per_step": [step["max_sampled_update"] for step in probe.steps],
        "checks": checks if args.all_checks else failed,
        "checks_passed": len(checks) - len(failed),
        "checks_total": len(checks),
        "ok": not failed,
    }


def run_in_worker(run: str, argv: list[str]) -> dict:
    log(f"[{run}] fresh process: build at real width, {' + '.join(map(str, worker_steps(argv)))} steps")
    result = run_worker(__file__, argv, run, tail_lines=6)
    if "error" in result:
        result = {"ok": False, **result}
    log(summary_line(run, result))
    return result


def worker_steps(argv: list[str]) -> tuple[int, int]:
    args = parse_args(argv)
    return args.warmup, args.steps


def summary_line(run: str, result: dict) -> str:
    if "error" in result:
        return f"[{run}] error: {result['error']}"
    return (
        f"[{run}] {result['s_per_step']:.2f} s/step, peak RSS {result['memory_mib']['peak_rss']:.0f} MiB, "
        f"{result['parameters']['trainable']:,} / {result['parameters']['total']:,} trained, "
        f"loss {result['losses'].get('loss')}, checks {result['checks_passed']}/{result['checks_total']}"
        + ("" if result["ok"] else " FAILED")
    )


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def selected_runs(names: list[str]) -> list[str]:
    runs = []
    for name in names:
        matched = [run for run in RUNS if run == name or run.split("/")[0] == name]
        if not matched:
            raise SystemExit(f"--families: unknown {name!r}; choose from {', '.join(FAMILIES + RUNS)}")
        runs += [run for run in matched if run not in runs]
    return runs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(FAMILIES),
        help=f"families ({', '.join(FAMILIES)}) or single runs ({', '.join(RUNS)}); default: all",
    )
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per run (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the measured ones (default 1)")
    parser.add_argument("--layers", type=int, default=2, help="blocks per tower / decoder layers (default 2)")
    parser.add_argument("--batch_size", type=int, default=2, help="image-caption pairs per CLIP step (default 2)")
    parser.add_argument("--tta_batch_size", type=int, default=2, help="images per task per TTA step (default 2)")
    parser.add_argument("--conversations", type=int, default=1, help="MoIIE conversations per step (default 1)")
    parser.add_argument("--text_tokens", type=int, default=300, help="MoIIE text words per conversation (300)")
    parser.add_argument(
        "--param_dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype the weights are built in (default bfloat16); the Trainer runs with bf16=True",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths instead of the real ones (smoke test)")
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="run every family in this process (no per-family peak memory; for the smoke test)",
    )
    parser.add_argument("--all_checks", action="store_true", help="list every check in the JSON, not only failures")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the runs of an existing --output file that this command does not measure (each "
        "result names the command and step counts that measured it)",
    )
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.layers < 2:
        parser.error("--steps must be >= 1, --warmup >= 0 and --layers >= 2 (MoIIE's MoE layer is layer 1)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(args._worker, args)))
        return 0
    runs = selected_runs(args.families)
    results = {}
    for run in runs:
        if args.in_process:
            try:
                results[run] = measure(run, args)
            except Exception as err:  # reported like a worker's failure
                results[run] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            log(summary_line(run, results[run]))
        else:
            results[run] = run_in_worker(run, argv)
    command = "python benchmarks/real_width_step.py " + " ".join(argv)
    timing = {
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "statistic": "median of the measured steps",
        "step": "Trainer step begin -> step end (forward, backward, optimizer step; batches already collated), "
        "without this benchmark's own checks",
    }
    for result in results.values():
        result.update(command=command, warmup_steps=args.warmup, measured_steps=args.steps)
    if args.update and args.output and Path(args.output).is_file():
        # Runs measured by an earlier command (with other step counts, say) are kept, each with its own command.
        earlier = json.loads(Path(args.output).read_text())
        for run, result in earlier.get("results", {}).items():
            if run not in results:
                result.setdefault("command", earlier.get("command"))
                result.setdefault("warmup_steps", earlier.get("timing", {}).get("warmup_steps"))
                result.setdefault("measured_steps", earlier.get("timing", {}).get("measured_steps"))
                results[run] = result
        results = {run: results[run] for run in RUNS if run in results}
    report = {
        **report_header("real_width_step.py", argv, torch.device("cpu"), args.threads),
        "widths": "tiny (smoke test)" if args.tiny else "real",
        "layers": args.layers,
        "param_dtype": args.param_dtype,
        "timing": timing,
        "training": "each family's Trainer and TrainingArguments with the recipe's optimizer and peak learning "
        "rate, held constant (warmup_steps=0, lr_scheduler_type='constant'), bf16=True, use_cpu=True, "
        "report_to='none', save_strategy='no', logging_steps=1",
        "memory_method": "fresh worker process per run (unless --in_process): peak_rss is the worker's lifetime "
        "maximum resident set (VmHWM: interpreter, model build and the steps), glibc "
        "MALLOC_MMAP_THRESHOLD_=65536",
        "results": results,
        "ok": all(result.get("ok") for result in results.values()),
    }
    write_report(report, args.output)
    if not report["ok"]:
        log("FAILED: " + ", ".join(run for run, result in results.items() if not result.get("ok")))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

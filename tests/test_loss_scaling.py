"""Loss weights independent of gradient accumulation and of the number of processes, in every Trainer subclass: MCL
stages, CLIP-MoE router training, MoDE data experts, MoIIE stages 1 and 2, WEMoE test-time adaptation, AdaMerging.

One SGD step (lr 0.5, so that a wrongly weighted term shows) through each family's own Trainer:
- k accumulated micro-batches of one repeated batch move the trained parameters exactly as that batch alone does
  (before the fix, MoIIE's balance losses counted k times: at k = 2 a vision router's step was 93 % off);
- 2 gloo processes give what 1 process gives on the same samples: 1 process accumulating the 2 processes'
  micro-batches where every term is a per-token or per-micro-batch mean (MoIIE, TTA, AdaMerging), and, for the
  contrastive losses, whose negatives are the all-gathered batch, 1 process on the gathered batch (MCL, MoDE), or a
  hand computation of contrastive loss over the gathered batch + the mean of each process' router loss (router
  training). All 2-process runs share the same 2 forked processes. (Before the fix MoIIE's LM loss weighed 1/W.)
- MoIIE under DeepSpeed on 2 processes, ZeRO-2 with 2 accumulated micro-batches per process and ZeRO-3: the same step
  as 1 process without DeepSpeed (to DeepSpeed's float32 master-weight rounding).
Models and inputs are float64: in float32 a router's step changes by ~1e-3 of itself when the same samples are merely
summed in another order.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loss_scaling import (
    DTYPE,
    LEARNING_RATE,
    adamerging,
    mcl,
    mode_expert,
    moiie,
    router,
    run_distributed,
    save_toy_moiie,
    tta,
)
from PIL import Image

from helpers import clip_inputs


ACCUMULATION = 2  # any k > 1 shows a term weighted k times; 2 keeps the test fast
# Each trained tensor's step (new - initial) must match the expected step to this relative (Frobenius) error; the
# runs differ only in the order of float64 sums (MCL shuffles its rows; all-reduces add in another order).
STEP_RTOL = 1e-6
# DeepSpeed keeps float32 master weights: a LayerNorm weight near 1 stepped by ~1e-3 carries float32 rounding of its
# value, up to ~1e-4 of its step; a wrongly weighted term is off by tens of percent.
DEEPSPEED_STEP_RTOL = 1e-3
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is several times faster than two on shared, busy cores (no spinning thread pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths(toy_clip_dir, upcycled_dir, tmp_path_factory):
    moiie_dir = save_toy_moiie(tmp_path_factory.mktemp("loss-scaling") / "moiie")
    return {"clip": toy_clip_dir, "clip_moe": upcycled_dir, "moiie": moiie_dir}


@pytest.fixture(scope="module")
def data(paths, tmp_path_factory):
    """Micro-batches of every recipe: two different ones (`0`, `1`) and, for MCL, rows."""
    from transformers import CLIPConfig

    from hf_moe.modeling import MoIIEProcessor
    from hf_moe.moiie.data import MoIIECollator, load_conversations
    from hf_moe.we_moe.tta import INPUTS_KEY

    clip_config = CLIPConfig.from_pretrained(paths["clip"])
    clip = [clip_inputs(clip_config, batch_size=3, seed=seed, pad=2 * (seed == 0)) for seed in (0, 1)]
    rows = [{key: value[i] for key, value in batch.items()} for batch in clip for i in range(3)]

    folder = tmp_path_factory.mktemp("moiie-data")
    for seed, name in enumerate(["seven.png", "three.png"]):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    samples = [
        {
            "id": "a",
            "image": "seven.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat digit is this ?"},
                {"from": "gpt", "value": "seven"},
                {"from": "human", "value": "is this even ?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "id": "b",
            "image": "three.png",
            "conversations": [{"from": "human", "value": "<image>\nwhat digit ?"}, {"from": "gpt", "value": "three"}],
        },
    ]
    (folder / "data.json").write_text(json.dumps(samples))
    conversations = load_conversations(folder / "data.json", folder)
    collator = MoIIECollator(MoIIEProcessor.from_pretrained(paths["moiie"]))
    moiie_batches = [collator([conversations[i]]) for i in range(2)]

    generator = torch.Generator().manual_seed(0)
    size, dim = clip_config.vision_config.image_size, clip_config.projection_dim
    images = [
        {INPUTS_KEY: {task: torch.randn(2, 3, size, size, generator=generator) for task in ("a", "b")}}
        for _ in range(2)
    ]
    heads = {
        task: F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
        for task, classes in [("a", 3), ("b", 4)]
    }
    from transformers import CLIPModel

    vision = CLIPModel.from_pretrained(paths["clip"]).vision_model
    task_vectors = [
        {
            name: 0.05 * torch.randn(p.shape, generator=generator)
            for name, p in vision.named_parameters()
            if name.startswith("encoder.layers.")
        }
        for _ in range(2)
    ]
    clip, rows, moiie_batches, images = as_dtype([clip, rows, moiie_batches, images])
    return {
        "clip": clip,
        "rows": rows,
        "moiie": moiie_batches,
        "images": images,
        "heads": heads,
        "task_vectors": task_vectors,
    }


def as_dtype(value):
    """`value` (nested lists and dicts of tensors) with its floating-point tensors in `DTYPE`."""
    if isinstance(value, dict):
        return {key: as_dtype(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_dtype(item) for item in value]
    return value.to(DTYPE) if value.is_floating_point() else value


def initial_parameters(paths, recipe: str, data) -> dict[str, torch.Tensor]:
    from transformers import CLIPModel

    from hf_moe.modeling import CLIPMoEModel, MoIIEPhi3ForCausalLM

    if recipe == "router":
        return dict(CLIPMoEModel.from_pretrained(paths["clip_moe"]).named_parameters())
    if recipe.startswith("moiie"):
        return dict(MoIIEPhi3ForCausalLM.from_pretrained(paths["moiie"]).named_parameters())
    if recipe == "adamerging":
        return {"merge_coefficients": torch.full((len(data["task_vectors"][0]), 2), 0.3)}
    model = CLIPModel.from_pretrained(paths["clip"])
    return dict(model.named_parameters())


def one_step(recipe: str, paths, data, micro_batches: int, which: int = 0):
    """The trained parameters after one step over `micro_batches` copies of micro-batch `which` (1 process)."""
    if recipe == "mcl":
        # One cluster per copy of the same 3 rows: every micro-batch is those rows (in some order).
        rows = data["rows"][3 * which : 3 * which + 3] * micro_batches
        labels = torch.arange(micro_batches).repeat_interleave(3)
        return mcl(paths, rows, labels, 3, micro_batches)
    if recipe == "router":
        return router(paths, [data["clip"][which]] * micro_batches, micro_batches)
    if recipe == "mode_expert":
        return mode_expert(paths, [data["clip"][which]] * micro_batches, micro_batches)
    if recipe.startswith("moiie"):
        return moiie(paths, [data["moiie"][which]] * micro_batches, micro_batches, recipe.split("_")[1])
    if recipe == "tta":
        return tta(paths, [data["images"][which]] * micro_batches, micro_batches, data["heads"])
    if recipe == "adamerging":
        items = [data["images"][which]] * micro_batches
        return adamerging(paths, items, micro_batches, data["heads"], data["task_vectors"])
    raise ValueError(recipe)


RECIPES = ["mcl", "router", "mode_expert", "moiie_pretrain", "moiie_finetune", "tta", "adamerging"]


def step_errors(actual: dict, expected: dict, initial: dict) -> dict[str, float]:
    """{tensor: |actual step - expected step| / |expected step|} (Frobenius norms); the step of a tensor whose
    gradient vanishes in exact arithmetic (a key bias: softmax ignores a constant) is rounding noise, so steps count
    as at least 1e-3 of the largest one."""
    assert actual.keys() == expected.keys() and actual
    steps = {name: (expected[name] - initial[name].detach().to(expected[name])).norm().item() for name in expected}
    largest = max(steps.values())
    assert largest > 0, "the step moved no trained parameter"
    return {
        name: ((actual[name] - expected[name]).norm() / max(steps[name], 1e-3 * largest)).item() for name in expected
    }


def assert_same_step(actual: dict, expected: dict, initial: dict, rtol: float = STEP_RTOL):
    errors = step_errors(actual, expected, initial)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative step error {errors[worst]:.3g} ({len(errors)} tensors)"


@pytest.mark.parametrize("recipe", RECIPES)
def test_accumulated_copies_of_one_micro_batch_step_as_that_micro_batch(recipe, paths, data):
    once = one_step(recipe, paths, data, 1)
    accumulated = one_step(recipe, paths, data, ACCUMULATION)
    assert_same_step(accumulated, once, initial_parameters(paths, recipe, data))


@pytest.fixture(scope="module")
def two_processes(paths, data):
    """Each recipe's step in 2 gloo processes, rank r reading micro-batch r (MCL: its half of a 6-row cluster)."""
    clip, images = data["clip"], data["images"]
    runs = {
        "mcl": ("mcl", (paths, data["rows"], torch.zeros(6, dtype=torch.long), 3, 1), {}),
        "router": ("router", (paths, clip, 1), {}),
        "mode_expert": ("mode_expert", (paths, clip, 1), {}),
        "moiie_pretrain": ("moiie", (paths, data["moiie"], 1, "pretrain"), {}),
        "moiie_finetune": ("moiie", (paths, data["moiie"], 1, "finetune"), {}),
        "tta": ("tta", (paths, images, 1, data["heads"]), {}),
        "adamerging": ("adamerging", (paths, images, 1, data["heads"], data["task_vectors"]), {}),
    }
    if HAS_DEEPSPEED:  # last: a ZeRO-3 run leaves its config active in the process
        moiie_batches = data["moiie"]
        zero2, zero3 = ({"deepspeed": str(EXAMPLES / f"ds_zero{stage}.json")} for stage in (2, 3))
        # 2 accumulated micro-batches per process, 4 in all: each of the 2 micro-batches twice
        runs["zero2_accumulated"] = ("moiie", (paths, moiie_batches * 2, 2, "finetune"), zero2)
        runs["zero3"] = ("moiie", (paths, moiie_batches, 1, "finetune"), zero3)
    return run_distributed(runs)


def single_process_reference(recipe: str, paths, data) -> dict:
    """What 1 process computes on the 2 processes' samples."""
    clip = data["clip"]
    if recipe == "mcl":  # the gathered batch: the whole cluster of 6 rows in one micro-batch
        return mcl(paths, data["rows"], torch.zeros(6, dtype=torch.long), 6, 1)
    if recipe == "mode_expert":
        gathered = {key: torch.cat([batch[key] for batch in clip]) for key in clip[0]}
        return mode_expert(paths, [gathered], 1)
    if recipe == "router":
        return router_by_hand(paths, clip)
    if recipe.startswith("moiie"):  # LM loss per token of both samples, balance losses per micro-batch
        return moiie(paths, data["moiie"], 2, recipe.split("_")[1])
    if recipe == "tta":
        return tta(paths, data["images"], 2, data["heads"])
    if recipe == "adamerging":
        return adamerging(paths, data["images"], 2, data["heads"], data["task_vectors"])
    raise ValueError(recipe)


def router_by_hand(paths, batches: list[dict]) -> dict:
    """SGD step on: contrastive loss over the gathered batch + the mean over processes of each one's router loss."""
    from hf_moe.losses import clip_contrastive_loss
    from hf_moe.modeling import CLIPMoEModel
    from hf_moe.training import freeze_all_but

    model = CLIPMoEModel.from_pretrained(paths["clip_moe"], experts_implementation="eager", dtype=DTYPE)
    model.train()
    freeze_all_but(model, [r"\.router\."])
    outputs = [model(**batch, output_router_logits=True) for batch in batches]
    contrastive = clip_contrastive_loss(
        torch.cat([out.image_embeds for out in outputs]), torch.cat([out.text_embeds for out in outputs]), 100.0, 0.1
    )
    loss = contrastive + sum(out.router_loss for out in outputs) / len(outputs)
    loss.backward()
    return {n: (p - LEARNING_RATE * p.grad).detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_step_as_one_process_on_the_same_samples(recipe, paths, data, two_processes):
    expected = single_process_reference(recipe, paths, data)
    initial = initial_parameters(paths, recipe, data)
    assert_same_step(two_processes[recipe], expected, initial)
    assert_same_step(two_processes[f"{recipe}@1"], expected, initial)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed")
@pytest.mark.parametrize("run", ["zero2_accumulated", "zero3"])
def test_moiie_under_deepspeed_steps_as_one_process(run, paths, data, two_processes):
    """ZeRO-2 with 2 accumulated micro-batches per process, and ZeRO-3 (the README's stage-2 setting), on 2
    processes: the same step as 1 process without DeepSpeed (the Trainer passes `scale_wrt_gas=False`, so DeepSpeed
    adds no division by the accumulation steps of its own)."""
    expected = single_process_reference("moiie_finetune", paths, data)
    initial = initial_parameters(paths, "moiie_finetune", data)
    assert_same_step(two_processes[run], expected, initial, rtol=DEEPSPEED_STEP_RTOL)
    assert_same_step(two_processes[f"{run}@1"], expected, initial, rtol=DEEPSPEED_STEP_RTOL)

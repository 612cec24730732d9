"""Harness of tests/test_loss_scaling.py: one optimizer step of each family's Trainer (SGD, lr 0.5, no clipping, no
schedule) on given micro-batches, returning the trained parameters, in one process or in each of several gloo
processes (`run_distributed`: every recipe in the same forked processes)."""

import os
import socket
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset


LEARNING_RATE = 0.5  # large, so that a wrongly weighted loss term moves the parameters visibly
# float64 weights: in float32 a router's step (a small sum of large, cancelling contrastive gradients) changes by
# about 1e-3 of itself when the same samples are merely summed in another order, which would hide a wrong weight.
DTYPE = torch.float64
SGD_STEP = dict(
    max_steps=1,
    learning_rate=LEARNING_RATE,
    optim="sgd",
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=0.0,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    dataloader_num_workers=0,
    logging_steps=1,
    seed=0,
)
TTA_TRAINABLE = [r"post_layernorm"]  # a dense CLIP has no router: its final vision LayerNorm stands in for one


class Items(Dataset):
    """Each item is given as it is (a whole micro-batch, or one sample's row)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def first_item(items: list):
    return items[0]


def stack_rows(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def trained_parameters(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in trained):  # ZeRO-3: each process holds a partition
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([p for _, p in trained]):
            return {name: p.detach().clone() for name, p in trained}
    return {name: p.detach().clone() for name, p in trained}


def _train(trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return trained_parameters(trainer)


def _output_dir() -> str:
    return tempfile.mkdtemp(prefix="loss-scaling-")


# Each recipe: (paths, micro-batches or rows, gradient_accumulation_steps, ...) -> trained parameters after one step.
# Micro-batches are given as items of a dataset read one per micro-batch; a process reads every W-th one.


def mcl(paths: dict, rows: list[dict], labels: torch.Tensor, batch_size: int, steps: int):
    """An MCL stage (`MCLStageTrainer`: its cluster batch sampler, MLPs only) on a dense CLIP."""
    from transformers import CLIPModel

    from hf_moe.clip_moe.mcl import MCLStageTrainer
    from hf_moe.clip_moe.trainer import MCLTrainingArguments

    args = MCLTrainingArguments(
        output_dir=_output_dir(), per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps, **SGD_STEP
    )
    model = CLIPModel.from_pretrained(paths["clip"], dtype=DTYPE)
    trainer = MCLStageTrainer(
        model=model, args=args, train_dataset=Items(rows), data_collator=stack_rows, cluster_labels=labels
    )
    return _train(trainer)


def router(paths: dict, batches: list[dict], steps: int):
    """CLIP-MoE router training (`CLIPMoETrainer`, the recipe's arguments: routers only)."""
    from hf_moe.clip_moe.trainer import CLIPMoERouterTrainingArguments, CLIPMoETrainer
    from hf_moe.modeling import CLIPMoEModel

    args = CLIPMoERouterTrainingArguments(
        output_dir=_output_dir(), per_device_train_batch_size=1, gradient_accumulation_steps=steps, **SGD_STEP
    )
    model = CLIPMoEModel.from_pretrained(paths["clip_moe"], experts_implementation="eager", dtype=DTYPE)
    trainer = CLIPMoETrainer(model=model, args=args, train_dataset=Items(batches), data_collator=first_item)
    return _train(trainer)


def mode_expert(paths: dict, batches: list[dict], steps: int):
    """A MoDE data expert (`DataExpertTrainer`: the whole CLIP, learned logit scale capped at 100)."""
    from transformers import CLIPModel

    from hf_moe.mode.train_expert import DataExpertTrainer, DataExpertTrainingArguments

    args = DataExpertTrainingArguments(
        output_dir=_output_dir(), per_device_train_batch_size=1, gradient_accumulation_steps=steps, **SGD_STEP
    )
    model = CLIPModel.from_pretrained(paths["clip"], dtype=DTYPE)
    trainer = DataExpertTrainer(model=model, args=args, train_dataset=Items(batches), data_collator=first_item)
    return _train(trainer)


def moiie(paths: dict, batches: list[dict], steps: int, stage: str, **arguments):
    """A MoIIE stage (`MoIIETrainer`): `pretrain` (the projector) or `finetune` (LLM, MoE layers and projector)."""
    from hf_moe.modeling import MoIIEPhi3ForCausalLM
    from hf_moe.moiie.trainer import MoIIETrainer, MoIIETrainingArguments

    args = MoIIETrainingArguments(
        output_dir=_output_dir(),
        stage=stage,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=steps,
        **SGD_STEP,
        **arguments,
    )
    model = MoIIEPhi3ForCausalLM.from_pretrained(paths["moiie"], dtype=DTYPE, experts_implementation="eager")
    trainer = MoIIETrainer(model=model, args=args, train_dataset=Items(batches), data_collator=first_item)
    return _train(trainer)


def tta(paths: dict, items: list[dict], steps: int, heads: dict):
    """WEMoE test-time adaptation (`TTATrainer`) of a dense CLIP, its final vision LayerNorm standing in for the
    routers."""
    from transformers import CLIPModel

    from hf_moe.we_moe.tta import TTATrainer, TTATrainingArguments

    args = TTATrainingArguments(
        output_dir=_output_dir(),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=steps,
        trainable_parameters=TTA_TRAINABLE,
        **SGD_STEP,
    )
    model = CLIPModel.from_pretrained(paths["clip"], dtype=DTYPE)
    return _train(TTATrainer(model=model, args=args, train_dataset=Items(items), heads=heads))


def adamerging(paths: dict, items: list[dict], steps: int, heads: dict, task_vectors: list[dict]):
    """AdaMerging's coefficients (`AdaMergingCLIP` trained by `TTATrainer`)."""
    from transformers import CLIPModel

    from hf_moe.we_moe.adamerging import AdaMergingCLIP
    from hf_moe.we_moe.tta import TTATrainer, TTATrainingArguments

    args = TTATrainingArguments(
        output_dir=_output_dir(),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=steps,
        trainable_parameters=[r"^merge_coefficients$"],
        **SGD_STEP,
    )
    wrapper = AdaMergingCLIP(CLIPModel.from_pretrained(paths["clip"], dtype=DTYPE), task_vectors)
    return _train(TTATrainer(model=wrapper, args=args, train_dataset=Items(items), heads=heads))


RECIPES = {
    "mcl": mcl,
    "router": router,
    "mode_expert": mode_expert,
    "moiie": moiie,
    "tta": tta,
    "adamerging": adamerging,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, runs: dict, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    from transformers.utils import logging

    # A forked child inherits the parent's (single-process) accelerate state: start it afresh from the environment.
    AcceleratorState._reset_state(reset_partial_state=True)
    logging.set_verbosity_error()
    for name, (recipe, args, kwargs) in runs.items():
        trained = RECIPES[recipe](*args, **kwargs)
        if rank == 0:
            results[name] = trained
        else:  # every process must hold the same parameters after the step
            results[f"{name}@{rank}"] = trained


def run_distributed(runs: dict, world_size: int = 2) -> dict:
    """{name: trained parameters of rank 0} of every run {name: (recipe, args, kwargs)}, each run in turn in the same
    `world_size` gloo processes; the other ranks' parameters under `name@rank`."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        # Forked, not spawned: the children start with the parent's imports (spawning re-imports torch, transformers
        # and accelerate in each child: tens of seconds on busy cores); spawned if this process is in a process
        # group, which a child must not inherit.
        method = "spawn" if torch.distributed.is_initialized() else "fork"
        mp.start_processes(
            _worker, args=(world_size, free_port(), runs, results), nprocs=world_size, join=True, start_method=method
        )
        return {name: dict(value) for name, value in results.items()}


def save_toy_moiie(output_dir: Path) -> Path:
    """A toy MoIIE (2 decoder layers, MoE in layer 1; a 1-layer SigLIP) with its processor, saved in `output_dir`."""
    from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM
    from hf_moe.moiie import toy

    processor = toy.toy_processor("what digit is this ? seven three even yes no".split(), 16, num_image_tokens=4)
    config = MoIIEConfig(
        vision_config=toy.toy_vision_config(image_size=16, patch_size=8, num_layers=1).to_dict(),
        text_config=toy.toy_text_config(processor.tokenizer, num_layers=2).to_dict(),
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(0)
    MoIIEPhi3ForCausalLM(config).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir

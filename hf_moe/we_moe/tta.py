"""Test-time adaptation (TTA) of a merged model on unlabeled data (WEMoE, AdaMerging; METHODS.md section 3).

Each step takes one shuffled, UNLABELED batch of EVERY task and minimises

    loss = sum over tasks t of mean over the batch of H(softmax(exp(logit_scale) * normalize(image_embed) @ head_t^T))

with H(p) = -sum p log(p + 1e-8), head_t the task's zero-shot head (for each class, every template through the text
tower and text projection, L2-normalised, averaged, normalised again: `hf_moe.evaluation.class_embeddings`). Only the
parameters matching `trainable_parameters` train (WEMoE: the routers; AdaMerging: its merging coefficients).

    hf-moe tta-wemoe --model WEMOE_DIR --tasks svhn/ mnist/ dtd/ --output_dir OUT [TrainingArguments flags]
    accelerate launch examples/we_moe/tta_wemoe.py --model WEMOE_DIR --tasks ... --output_dir OUT

How the loss is averaged, with k = `gradient_accumulation_steps` and W processes (tests/test_loss_scaling.py): each
task's entropy is a mean over the images of one micro-batch (B = per_device_train_batch_size per task) on one
process; the Trainer divides the loss by k (`loss_is_scaled_for_ga = False`) and DDP / DeepSpeed average the
gradients over processes, so every task's entropy has weight 1 at any k and W, averaged over the k x W x B images a
step sees (`TaskBatches` gives each micro-batch of each process its own batch: max_steps x k x W batches). For a
per-sample model (WEMoE's routers, AdaMerging) that is exactly the mean entropy over those images; a `batch_reduce`
model merges one model per micro-batch, so its routing, and nothing else, depends on how a step is split.

Works for any model with `get_image_features(pixel_values=...)` and a `logit_scale` parameter (a `CLIPModel`,
`WEMoECLIPModel`, `hf_moe.we_moe.adamerging.AdaMergingCLIP`). Re-running continues the same job (options and input
fingerprints recorded, `hf_moe.training.TrainingJob`), resumes an interrupted one from its last complete checkpoint,
and leaves a finished one untouched.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..arguments import CardArguments, parse_command_line
from ..evaluation import ZERO_SHOT_HEADS_FILE, EvalMode, class_embeddings, projected_embeddings, write_zero_shot_heads
from ..training import RecordedMetricsMixin, complete_job, freeze_all_but, job_already_done, train_from_last_checkpoint


logger = logging.get_logger(__name__)

ENTROPY_EPS = 1e-8
INPUTS_KEY = "task_pixel_values"
# Written with the adapted model: the class names and templates of each task's head, which `hf-moe eval zero-shot
# --task` reads back to evaluate a task as it was adapted. A re-run does not read it: it is written only once the job
# completes (a finished job returns before any head is needed), and a resumed one rebuilds the same heads from the
# recorded options, the fingerprinted task folders and the frozen text tower.
HEADS_FILE = ZERO_SHOT_HEADS_FILE

# CLIP's zero-shot templates of the WEMoE paper's eight tasks (CLIP repository, data/prompts.md; the task-arithmetic
# and WEMoE code use the same), by task-folder name (lowercase, letters and digits only).
CLIP_TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "mnist": ('a photo of the number: "{}".',),
    "svhn": ('a photo of the number: "{}".',),
    "eurosat": tuple(f"a centered satellite photo of {article}{{}}." for article in ("", "a ", "the ")),
    "gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "dtd": tuple(
        f"a photo of {article} {{}} {kind}."
        for article in ("a", "the")
        for kind in ("texture", "pattern", "thing", "object")
    ),
    "resisc45": tuple(
        f"{source} {kind} of {article}{{}}."
        for article in ("", "a ", "the ")
        for kind in ("imagery", "photo", "view")
        for source in ("satellite", "aerial")
    ),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
}
CLIP_TASK_TEMPLATES["stanfordcars"] = CLIP_TASK_TEMPLATES["cars"]


def clip_task_templates(task_name: str) -> tuple[str, ...] | None:
    """CLIP's templates for a task named like one of the WEMoE paper's eight (`mnist`, `SVHN`, `stanford_cars`,
    `resisc45`, ...), or None."""
    return CLIP_TASK_TEMPLATES.get("".join(c for c in task_name.lower() if c.isalnum()))


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy -sum p log(p + 1e-8) of softmax(logits) (in fp32)."""
    probs = logits.float().softmax(dim=-1)
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1).mean()


def zero_shot_heads(
    model, processor, class_names: dict[str, list[str]], templates: dict[str, tuple[str, ...]], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """{task: (classes, dim) float32 head}: CLIP prompt ensembling with the task's class names and templates."""
    heads = {}
    with EvalMode(model, None):
        for task, names in class_names.items():
            head = class_embeddings(model, processor, names, templates[task], batch_size, progress=False)
            heads[task] = head.clone()  # out of inference mode: the loss's backward may save it
    return heads


class TaskBatches(Dataset):
    """Item k: {task: pixel_values of its k-th batch} for every task, each task's images in a fresh shuffled order
    per pass over it (seeded by `seed`, the task's position and the pass), so item k is the same whoever asks for it:
    a resumed run skips to the next step's batches without decoding the skipped ones.

    Args:
        tasks: {task name: datasets.Dataset with an `image` column} (labels unused).
        image_processor: Turns a list of PIL images into `pixel_values`.
        batch_size: Images per task per item.
        num_batches: Length of the dataset (the number of batches a run takes).
        seed: Shuffling seed.
    """

    def __init__(self, tasks: dict, image_processor, batch_size: int, num_batches: int, seed: int = 0):
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size and num_batches must be positive, got {batch_size} and {num_batches}.")
        for name, dataset in tasks.items():
            if len(dataset) == 0:
                raise ValueError(f"Task '{name}' has no images.")
        self.tasks, self.image_processor = tasks, image_processor
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        self._orders: dict[int, tuple[int, list[int]]] = {}

    def __len__(self) -> int:
        return self.num_batches

    def indices(self, task_position: int, item: int) -> list[int]:
        """Row indices of task number `task_position`'s images in batch `item`."""
        size = len(list(self.tasks.values())[task_position])
        rows = []
        for position in range(item * self.batch_size, (item + 1) * self.batch_size):
            epoch, offset = divmod(position, size)
            cached = self._orders.get(task_position)
            if cached is None or cached[0] != epoch:  # keep each task's current pass only
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + task_position * 10_007 + epoch)
                cached = self._orders[task_position] = (epoch, torch.randperm(size, generator=generator).tolist())
            rows.append(cached[1][offset])
        return rows

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        from ..evaluation import to_rgb_image

        batches = {}
        for position, (name, dataset) in enumerate(self.tasks.items()):
            images = [to_rgb_image(image) for image in dataset.select(self.indices(position, item))["image"]]
            batches[name] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {INPUTS_KEY: batches}


def _single_item(items: list[dict]) -> dict:
    return items[0]


@dataclass
class TTATrainingArguments(CardArguments, TrainingArguments):
    """`TrainingArguments` (and the card's `--license`) with the WEMoE test-time-adaptation recipe's defaults
    (METHODS.md section 3): Adam lr 1e-4 (the Trainer's AdamW with weight decay 0 is Adam), 1000 steps, cosine
    annealing over them without warm-up (the original repo's `CosineAnnealingLR(T_max=1000)`; the paper states Adam
    lr 1e-4 only), a batch of 16 per task, no gradient clipping; routers only."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate (WEMoE TTA: 1e-4)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (0: AdamW is Adam, as the paper)."})
    max_steps: int = field(default=1000, metadata={"help": "TTA steps (WEMoE: 1000; converges in about 200)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Schedule (the original repo: cosine annealing over the run)."}
    )
    warmup_steps: float = field(default=0, metadata={"help": "Warm-up steps (none)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Unlabeled images PER TASK in each step's batch (WEMoE: 16)."}
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none (the original)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    trainable_parameters: list[str] = field(
        default_factory=lambda: [r"router"],
        metadata={"help": "Regexes; parameters whose name matches one train, all others are frozen."},
    )
    logit_scale: float | None = field(
        default=None, metadata={"help": "Multiplier of the cosine logits; unset: exp(the model's logit_scale)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Batches are built by hand."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every trainable parameter takes part in each step: no search needed."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError(f"Test-time adaptation is step-based: --max_steps must be positive, got {self.max_steps}.")


class TTATrainer(RecordedMetricsMixin, Trainer):
    """`Trainer` minimising the summed per-task mean entropy of the zero-shot predictions (see the module docstring).

    Args:
        heads: {task: (classes, dim) zero-shot head}; the keys are the tasks of each batch.
        kwargs: As `Trainer`; `train_dataset` yields {"task_pixel_values": {task: pixel_values}} per item
            (`TaskBatches`).
    """

    # Each task's entropy is a per-micro-batch mean: the Trainer divides the loss by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, heads: dict[str, torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        self.heads = {task: head.detach().float() for task, head in heads.items()}
        trainable = freeze_all_but(self.model, self.args.trainable_parameters)
        count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            f"Test-time adaptation of {len(trainable)} tensors ({count:,} parameters) matching "
            f"{self.args.trainable_parameters} on {len(self.heads)} tasks"
        )

    def get_train_dataloader(self) -> DataLoader:
        # Each item of the dataset already is one step's batch of every task (B images each), shuffled inside the
        # dataset; the Trainer's sampler and collator (flat rows, per_device_train_batch_size rows per batch) do not
        # fit that, so the loader takes one item per step. Processes take alternate items (accelerate's sharding).
        loader = DataLoader(
            self.train_dataset,
            batch_size=1,
            shuffle=False,
            collate_fn=_single_item,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def _image_embeddings(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            return projected_embeddings(unwrapped.get_image_features(pixel_values=pixel_values))
        # A data-parallel wrapper syncs gradients only for calls through its forward: route get_image_features there.
        unwrapped.forward = unwrapped.get_image_features
        try:
            return projected_embeddings(model(pixel_values=pixel_values))
        finally:
            del unwrapped.forward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batches: dict[str, torch.Tensor] = inputs[INPUTS_KEY]
        unwrapped = self.accelerator.unwrap_model(model)
        if set(batches) != set(self.heads):
            raise ValueError(f"The batch has tasks {sorted(batches)}, the heads are for {sorted(self.heads)}.")
        dtype = next(p.dtype for p in unwrapped.parameters() if p.is_floating_point())
        scale = self.args.logit_scale
        if scale is None:
            scale = unwrapped.logit_scale.detach().float().exp()
        tasks = list(batches)
        sizes = [len(batches[task]) for task in tasks]
        config = getattr(unwrapped, "config", None)
        if getattr(config, "batch_reduce", False) or getattr(getattr(config, "vision_config", None), "batch_reduce", 0):
            # One merged model per batch: each task's batch must be its own forward (the original's semantics).
            embeddings = [self._image_embeddings(model, batches[task].to(dtype)) for task in tasks]
        else:
            # Per-sample models: a sample's embedding does not depend on its batch, so one forward over every
            # task's images gives the same numbers as one per task, and is the one forward a DDP step may take.
            pixel_values = torch.cat([batches[task] for task in tasks]).to(dtype)
            embeddings = self._image_embeddings(model, pixel_values).split(sizes)
        loss = 0.0
        for task, embedding in zip(tasks, embeddings):
            head = self.heads[task].to(embedding.device)
            logits = scale * torch.nn.functional.normalize(embedding.float(), dim=-1) @ head.T
            entropy = entropy_loss(logits)
            loss = loss + entropy
            if model.training:
                self._record(f"entropy/{task}", entropy)
        return (loss, {"loss": loss}) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# hf-moe tta-wemoe
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TTAScriptArguments:
    model: str = field(metadata={"help": "WEMoE model folder or Hub id (the output of hf-moe merge-wemoe)."})
    tasks: list[str] = field(
        metadata={"help": "Class-folder image sets, one per task (labels unused; class names from the folders)."}
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names as hf-moe eval zero-shot takes them (imagenet, cifar10, cifar100 or a file), one "
            "for every task or one per task; default: each task's folder names."
        },
    )
    templates: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "Prompt templates as hf-moe eval zero-shot takes them ('default', 'imagenet' or a file), one for "
            "every task or one per task. 'auto': CLIP's templates of a task whose folder is named like one of the "
            "paper's eight (mnist, svhn, eurosat, gtsrb, dtd, resisc45, sun397, cars), else as hf-moe eval zero-shot "
            f"'auto'. The class names and templates used are written to OUTPUT_DIR/{HEADS_FILE} (read by hf-moe eval "
            "zero-shot --task)."
        },
    )
    task_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "The task of each --tasks folder, by the names the WEMoE stores (merge-wemoe --task_names); "
            "default: the folders' names, matched to the stored ones.",
            "nargs": "+",
        },
    )
    split: str | None = field(default=None, metadata={"help": "Split, when a task folder has several."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow --model to run model code from its folder or Hub repo."}
    )


TTA_NOT_RESULT_OPTIONS = {"tasks", "trust_remote_code"}


def _name_key(name: str) -> str:
    return "".join(char for char in name.lower() if char.isalnum())


def _only(values: list):
    return values[0] if len(values) == 1 else None


def stored_task_names(model: str, trust_remote_code: bool = False) -> list[str] | None:
    """The task names `model` stores (a WEMoE's `task_names`: `merge-wemoe --task_names`, by default the fine-tunes'
    folder names, in the order of its task vectors), or None for a model without them (a dense CLIP)."""
    from ..loading import load_config

    config = load_config(model, trust_remote_code=trust_remote_code)
    names = getattr(getattr(config, "vision_config", None) or config, "task_names", None)
    return list(names) if names else None


def task_names(task_dirs: list[str], names: list[str] | None = None, stored: list[str] | None = None) -> list[str]:
    """Each task's name: `names` (one per folder) or its folder's name, unique.

    The contract with the merge, when the model stores its task names (`stored`): every task is one of them. A
    name equal to a stored one, or equal up to case and punctuation (`SVHN`, `svhn`), is that task, spelt as stored;
    folders none of whose names the model stores, as many as its tasks and not named by `names`, are its tasks in
    the merge's order (warned, naming both lists: per-sample routing does not depend on the names, only the heads'
    labels do). Anything else (a name the model does not store) is refused, naming the folder and both lists,
    before anything is read or written."""
    folders = [Path(task).expanduser().resolve().name for task in task_dirs]
    named = names is not None
    if named and len(names) != len(task_dirs):
        raise ValueError(f"--task_names takes one name per --tasks folder: got {len(names)} for {len(task_dirs)}.")
    names = list(folders if names is None else names)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        given = "--task_names" if named else "Task folders"
        raise ValueError(
            f"{given} must have distinct names; {duplicates} appear more than once (folders such as "
            "svhn/test and mnist/test are named by --task_names svhn mnist)."
        )
    if not stored:
        return names
    by_key: dict[str, list[str]] = {}
    for name in stored:
        by_key.setdefault(_name_key(name), []).append(name)
    # Up to case and punctuation only where that names one stored task.
    matched = [name if name in stored else _only(by_key.get(_name_key(name), [])) for name in names]
    if not named and not any(matched) and len(names) == len(stored):
        logger.warning(
            f"The model's tasks are {stored}, the task folders are named {names}: taking the folders as its tasks in "
            "the merge's order (name them with --task_names to say which is which)."
        )
        return list(stored)
    for name, match, folder in zip(names, matched, task_dirs):
        if match is None:
            raise ValueError(
                f"Task folder '{folder}' is task '{name}', which the model does not store: its tasks are {stored} "
                f"(merge-wemoe --task_names), the task folders give {names}. Name each folder's task with --task_names "
                "(one of the model's, per --tasks folder) or rename the folder."
            )
    repeated = sorted({name for name in matched if matched.count(name) > 1})
    if repeated:
        raise ValueError(f"Several task folders ({names}) are the model's task(s) {repeated}; give each task once.")
    return matched


def _per_task(values: list | None, count: int, option: str) -> list:
    if values is None:
        return [None] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise ValueError(f"{option} takes one value for every task or one per task ({count}), got {len(values)}.")
    return list(values)


def load_tasks(script_args: TTAScriptArguments, names: list[str] | None = None) -> tuple[dict, dict, dict]:
    """{task: dataset}, {task: class names}, {task: templates} of `script_args.tasks` (validated), named `names`
    (default: `task_names` of the folders and `script_args.task_names`, unchecked against a model).

    Images that cannot be decoded are skipped, counted and logged (a warning per task naming a few of the files),
    as the image-text commands skip them; a task left without images, or whose folder has no class labels, is
    refused naming its folder. Run before anything is written."""
    from ..data import drop_unreadable_images
    from ..evaluation import dataset_class_names, load_image_dataset, resolve_templates, templates_option

    if not script_args.tasks:
        raise ValueError("--tasks needs at least one class-folder image set.")
    if names is None:
        names = task_names(script_args.tasks, getattr(script_args, "task_names", None))
    class_options = _per_task(script_args.class_names, len(names), "--class_names")
    template_options = _per_task(script_args.templates, len(names), "--templates")
    datasets, class_names, templates = {}, {}, {}
    for name, folder, classes, template in zip(names, script_args.tasks, class_options, template_options):
        dataset = load_image_dataset(folder, script_args.split)
        class_names[name], class_set = dataset_class_names(dataset, classes, folder)
        datasets[name], report = drop_unreadable_images(dataset, name=f"task '{name}'")
        if report.num_rows and not report.num_kept:
            raise ValueError(f"Task '{name}': no image of {folder} can be read ({report.summary()}).")
        # CLIP's templates by the folder's name (the task's, where --task_names or the model names it otherwise).
        known = None
        if template in (None, "auto") and class_set is None:
            known = clip_task_templates(Path(folder).expanduser().resolve().name) or clip_task_templates(name)
        templates[name] = known or resolve_templates(templates_option(template), class_set)
    return datasets, class_names, templates


def check_trainable(model, patterns: list[str], name: str) -> None:
    """Refuse a model none of whose parameter names matches `patterns` (before anything is written)."""
    import re

    if not any(re.search(pattern, key) for key, _ in model.named_parameters() for pattern in patterns):
        raise ValueError(
            f"No parameter of '{name}' ({type(model).__name__}) matches --trainable_parameters {patterns}: is it a "
            "WEMoE model (hf-moe merge-wemoe)?"
        )


def tta_job(
    script_args: TTAScriptArguments,
    training_args: TrainingArguments,
    command: str = "tta-wemoe",
    names: list[str] | None = None,
):
    from ..training import (
        TrainingJob,
        input_fingerprint,
        local_path,
        model_fingerprint,
        result_options,
    )

    options = result_options(script_args, training_args, exclude=TTA_NOT_RESULT_OPTIONS)
    options["model"] = local_path(script_args.model)
    options["task_names"] = names or task_names(script_args.tasks, getattr(script_args, "task_names", None))
    inputs = {"model": model_fingerprint(script_args.model)}
    for name, task in zip(options["task_names"], script_args.tasks):
        inputs[f"task:{name}"] = input_fingerprint(task)
    return TrainingJob(
        training_args.output_dir, command, options, inputs=inputs, owned_outputs=("checkpoint-*", "model*.safetensors")
    )


def tta_wemoe(script_args: TTAScriptArguments, training_args: TTATrainingArguments) -> Path:
    """Adapt the routers of `script_args.model` on the unlabeled images of `script_args.tasks`; save the model, its
    processor and a model card in `training_args.output_dir`. Re-running continues an interrupted job from its last
    complete checkpoint, returns a finished one untouched, and refuses one whose options, model or data differ."""
    from transformers import AutoModel, AutoProcessor

    from ..loading import check_model_path, load_pretrained

    output_dir = Path(training_args.output_dir)
    check_model_path(script_args.model)
    # The tasks are the merge's: named as the model stores them, checked before anything is read or written.
    stored = stored_task_names(script_args.model, script_args.trust_remote_code)
    names = task_names(script_args.tasks, script_args.task_names, stored)
    job = tta_job(script_args, training_args, names=names)
    if job_already_done(
        job, training_args, f"Test-time adaptation in {output_dir} is already complete; nothing to do."
    ):
        return output_dir

    datasets, class_names, templates = load_tasks(script_args, names)
    model = load_pretrained(script_args.model, AutoModel, trust_remote_code=script_args.trust_remote_code)
    if not hasattr(model, "get_image_features") or not hasattr(model, "logit_scale"):
        raise ValueError(
            f"'{script_args.model}' loads as {type(model).__name__}, which has no get_image_features / logit_scale: "
            "test-time adaptation needs a CLIP-like model with its text tower (e.g. WEMoECLIPModel)."
        )
    processor = AutoProcessor.from_pretrained(script_args.model, trust_remote_code=script_args.trust_remote_code)
    check_trainable(model, training_args.trainable_parameters, script_args.model)
    heads = zero_shot_heads(model, processor, class_names, templates)
    num_batches = training_args.max_steps * training_args.gradient_accumulation_steps * training_args.world_size
    dataset = TaskBatches(
        datasets,
        getattr(processor, "image_processor", processor),
        training_args.per_device_train_batch_size,
        num_batches,
        seed=training_args.seed,
    )
    job.record()
    # We push the final folder ourselves, with our model card; the Trainer would push every checkpoint with its own.
    args = replace(training_args, push_to_hub=False)
    trainer = TTATrainer(model=model, args=args, train_dataset=dataset, heads=heads)
    train_from_last_checkpoint(trainer, output_dir, "test-time adaptation")
    trainer.save_model()

    def write_outputs():
        processor.save_pretrained(output_dir)
        write_heads_file(output_dir, class_names, templates)
        _write_card(output_dir, script_args, training_args, class_names)

    return complete_job(trainer, job, training_args, write_outputs)


def write_heads_file(output_dir: Path, class_names: dict, templates: dict) -> None:
    """{task: {"class_names", "templates"}} of the zero-shot heads, for evaluating each task as it was adapted
    (`hf-moe eval zero-shot --task`)."""
    write_zero_shot_heads(output_dir, class_names, templates)


def _write_card(output_dir: Path, script_args, training_args, class_names: dict) -> None:
    from ..cards import CardSpec, options_table, write_training_card
    from ..conversion.merge_wemoe import WEMOE_USAGE
    from ..training import result_options

    options = result_options(script_args, training_args, exclude={"trust_remote_code", "tasks"})
    tasks = ", ".join(f"`{name}` ({len(names)} classes)" for name, names in class_names.items())
    how_built = (
        f"`hf-moe tta-wemoe`: the routers of `{script_args.model}` adapted at test time on the unlabeled images "
        f"of {tasks} (every other weight frozen), minimising the sum over tasks of the mean entropy of the "
        "zero-shot predictions, one shuffled batch of every task per step (WEMoE, Tang et al. 2024).\n\n"
        f"{options_table(options)}"
    )
    card = CardSpec(
        base_model=script_args.model, how_built=how_built, tags=("clip", "we-moe", "model-merging"), usage=WEMOE_USAGE
    )
    write_training_card(output_dir, training_args, card)


def main(argv: list[str] | None = None) -> Path:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((TTAScriptArguments, TTATrainingArguments), prog="hf-moe tta-wemoe")
    script_args, training_args = parse_command_line(parser, argv)
    return tta_wemoe(script_args, training_args)

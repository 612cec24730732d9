"""AdaMerging, layer-wise (Yang et al., ICLR 2024): task-arithmetic merging whose coefficients are learned per layer
and task by test-time entropy minimisation on unlabeled data, the strongest baseline of the WEMoE paper.

    theta_l = theta_0,l + sum_i lambda_{l,i} tau_{i,l},   lambda initialised to 0.3 (= task arithmetic, scaling 0.3)

A "layer" is, as in the original code (and fusion-bench's `LayerWiseMergedModel`), every parameter tensor of the
vision tower (`granularity="tensor"`: about 1.3K coefficients for ViT-B/32 and 8 tasks, the paper's count);
`granularity="block"` shares one coefficient per encoder block (the other tensors keep one each). Coefficients are
clamped to [0, 1] in the merge, as the original (`clamp=False` leaves them free).

`AdaMergingCLIP` wraps a pretrained `CLIPModel` (its text tower gives the zero-shot heads) and computes the merged
vision tower functionally (`torch.func.functional_call`), so the entropy loss's gradients reach the coefficients, and
only them: it trains with `hf_moe.we_moe.tta.TTATrainer` (`trainable_parameters=[r"merge_coefficients"]`). The
result is an ordinary `CLIPModel` (`merged_model()`). Applying learned coefficients is the merge method `adamerging`
of `hf_moe.merging` (`adamerging_merge(pretrained, task_vectors, coefficients={key: [lambda per task]})`), registered
when that module is imported; `hf-moe merge` refuses it, pointing here, because its coefficients are trained.

Loss: `TTATrainer`'s, the sum over tasks of the mean entropy of one micro-batch's images, each micro-batch and
process its own batch, averaged over the k accumulated micro-batches and the W processes: every task has weight 1 at
any `--gradient_accumulation_steps` and number of processes (see `hf_moe.we_moe.tta`).

    python -m hf_moe.we_moe.adamerging PRETRAINED FINETUNED [FINETUNED ...] --tasks TASK_DIR [TASK_DIR ...] \
        --output_dir OUT [TrainingArguments flags]
"""

import copy
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.func import functional_call
from transformers.utils import logging

from ..arguments import parse_command_line
from ..merging import (
    StateDict,
    adamerging_merge,  # noqa: F401  (the `adamerging` merge method, registered in merging)
    layer_index,
    vision_tower_module,
)


if typing.TYPE_CHECKING:  # for the annotation only: `adamerging` imports tta's parts when it runs, as below
    from .tta import TTATrainingArguments


logger = logging.get_logger(__name__)

COEFFICIENTS_FILE = "adamerging_coefficients.json"
GRANULARITIES = ("tensor", "block")


def coefficient_groups(keys: Sequence[str], granularity: str = "tensor") -> tuple[list[int], list[str]]:
    """(group index of each key, group names): one group per tensor, or per encoder block (`block`)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    names, index, groups = [], {}, []
    for key in keys:
        layer = layer_index(key) if granularity == "block" else None
        name = f"encoder.layers.{layer}" if layer is not None else key
        if name not in index:
            index[name] = len(names)
            names.append(name)
        groups.append(index[name])
    return groups, names


class AdaMergingCLIP(torch.nn.Module):
    """A pretrained `CLIPModel` whose vision tower is theta_0 + sum_i lambda_{g(key),i} tau_{i,key}, the coefficients
    `merge_coefficients` `(num_groups, num_tasks)` a trainable parameter, everything else frozen.

    Args:
        model: The pretrained `CLIPModel` (text tower, projections and logit scale are used as they are).
        task_vectors: One state dict per task, keyed as the vision tower (`hf_moe.merging.task_vectors`).
        init_lambda: Initial coefficient (0.3: the task-arithmetic merge).
        granularity: `tensor` (one coefficient per tensor and task, the original) or `block`.
        clamp: Clamp the coefficients to [0, 1] in the merge (the original).
    """

    def __init__(
        self,
        model,
        task_vectors: Sequence[StateDict],
        init_lambda: float = 0.3,
        granularity: str = "tensor",
        clamp: bool = True,
    ):
        super().__init__()
        if not task_vectors:
            raise ValueError("AdaMerging needs at least one task vector.")
        self.model = model
        self.clamp = clamp
        self.granularity = granularity
        tower = vision_tower_module(model)
        parameters = dict(tower.named_parameters())
        self.keys = [key for key in task_vectors[0] if key in parameters]
        missing = sorted(set(task_vectors[0]) - set(parameters))
        if missing:
            raise ValueError(f"Task-vector keys {missing[:3]} are not parameters of the vision tower.")
        groups, self.group_names = coefficient_groups(self.keys, granularity)
        self.register_buffer("groups", torch.tensor(groups), persistent=False)
        for j, key in enumerate(self.keys):
            stacked = torch.stack([tv[key].float() for tv in task_vectors])  # (tasks, *shape)
            self.register_buffer(f"task_vector_{j}", stacked.to(parameters[key].device), persistent=False)
        self.merge_coefficients = torch.nn.Parameter(
            torch.full((len(self.group_names), len(task_vectors)), init_lambda)
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def config(self):
        return self.model.config

    def coefficients(self) -> torch.Tensor:
        """The coefficients used in the merge `(num_groups, num_tasks)` (clamped if `clamp`)."""
        return self.merge_coefficients.clamp(0.0, 1.0) if self.clamp else self.merge_coefficients

    def merged_vision_parameters(self) -> dict[str, torch.Tensor]:
        """{vision-tower key: theta_0 + sum_i lambda tau_i}, differentiable in the coefficients."""
        tower = vision_tower_module(self.model)
        parameters = dict(tower.named_parameters())
        weights = self.coefficients().float()
        merged = {}
        for j, key in enumerate(self.keys):
            stacked = getattr(self, f"task_vector_{j}")
            delta = torch.tensordot(weights[self.groups[j]], stacked, dims=1)
            merged[key] = (parameters[key].float() + delta).to(parameters[key].dtype)
        return merged

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Projected image embeddings of the merged vision tower (as `CLIPModel.get_image_features`)."""
        tower = vision_tower_module(self.model)
        outputs = functional_call(
            tower,
            self.merged_vision_parameters(),
            args=(),
            kwargs={"pixel_values": pixel_values, **kwargs},
            strict=False,
        )
        pooled = outputs.pooler_output
        projection = getattr(self.model, "visual_projection", None)
        return projection(pooled) if projection is not None else pooled

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.get_image_features(pixel_values=pixel_values, **kwargs)

    def coefficients_by_key(self) -> dict[str, list[float]]:
        """{vision-tower key: [lambda per task]} as used in the merge (the `adamerging` merge method's option)."""
        weights = self.coefficients().detach().float().cpu()
        return {key: weights[group].tolist() for key, group in zip(self.keys, self.groups.tolist())}

    @torch.no_grad()
    def merged_model(self):
        """An ordinary `CLIPModel` (a copy) with the merged vision tower."""
        merged = copy.deepcopy(self.model)
        vision_tower_module(merged).load_state_dict(self.merged_vision_parameters(), strict=False)
        for parameter in merged.parameters():
            parameter.requires_grad_(True)
        return merged.eval()


# ----------------------------------------------------------------------------------------------------------------
# Training and export
# ----------------------------------------------------------------------------------------------------------------


# `hf-moe adamerging --help`'s description: what it does and which kinds of model it takes.
DESCRIPTION = (
    "Layer-wise AdaMerging: task-arithmetic coefficients per layer and task learned by entropy minimisation on "
    "unlabeled task images. Takes a dense pretrained CLIPModel and dense fine-tunes of it (CLIPModel or "
    "CLIPVisionModel, model_type 'clip' / 'clip_vision_model'); hf-moe models (WEMoE, CLIP-MoE, MoIIE, MoDE) are "
    "refused."
)


@dataclass
class AdaMergingScriptArguments:
    pretrained: str = field(
        metadata={
            "aliases": ["--base"],
            "help": "Dense pretrained CLIPModel (Hub id or folder): theta_0 and the text tower.",
        }
    )
    finetuned: list[str] = field(
        metadata={"help": "Dense fine-tunes of PRETRAINED (CLIPModel or CLIPVisionModel), one per task."}
    )
    tasks: list[str] = field(metadata={"help": "Class-folder image sets, one per task (labels unused)."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "As hf-moe tta-wemoe: one for every task or one per task."}
    )
    templates: list[str] = field(
        default_factory=lambda: ["auto"], metadata={"help": "As hf-moe tta-wemoe: one for every task or one per task."}
    )
    split: str | None = field(default=None, metadata={"help": "Split, when a task folder has several."})
    init_lambda: float = field(default=0.3, metadata={"help": "Initial coefficient (0.3: task arithmetic)."})
    granularity: str = field(default="tensor", metadata={"help": "'tensor' (the original) or 'block'."})
    clamp: bool = field(default=True, metadata={"help": "Clamp the coefficients to [0, 1] (the original)."})
    # The TTA harness reads these two; fixed for AdaMerging.
    trust_remote_code: bool = field(default=False, metadata={"help": "Unused: CLIP needs no remote code."})

    @property
    def model(self) -> str:
        return self.pretrained


def adamerging(script_args: AdaMergingScriptArguments, training_args: "TTATrainingArguments") -> Path:
    """Learn the AdaMerging coefficients of `script_args.finetuned` on the unlabeled `script_args.tasks`, and write
    the merged `CLIPModel` with the processor, a model card and the coefficients (`adamerging_coefficients.json`) to
    `training_args.output_dir`. Resumable as `hf-moe tta-wemoe` (same job record and checkpoints).

    PRETRAINED must be a dense `CLIPModel`, the fine-tunes dense `CLIPModel`s or `CLIPVisionModel`s: an hf-moe
    model (WEMoE, CLIP-MoE, ...) is refused, naming its family. NaN or inf in a tensor or in `init_lambda` is
    refused, naming it, before anything is written; the pretrained model given as a fine-tune, a fine-tune given
    twice and more fine-tunes than task folders are warned about."""

    from ..cards import CardSpec, write_training_card
    from ..checkpoint_io import check_finite_options
    from ..loading import load_processor
    from ..merging import load_for_merge, task_vectors, warn_input_mistakes
    from ..training import complete_job, input_fingerprint, job_already_done, train_from_last_checkpoint
    from .tta import TaskBatches, TTATrainer, load_tasks, tta_job, zero_shot_heads

    check_finite_options({"init_lambda": script_args.init_lambda}, "adamerging option")
    warn_input_mistakes(script_args.pretrained, script_args.finetuned, num_tasks=len(script_args.tasks or ()))
    output_dir = Path(training_args.output_dir)
    job = tta_job(script_args, training_args, command="adamerging")
    for i, name in enumerate(script_args.finetuned):
        job.inputs[f"finetuned:{i}"] = input_fingerprint(name)
    if job_already_done(job, training_args, f"AdaMerging in {output_dir} is already complete; nothing to do."):
        return output_dir
    datasets, class_names, templates = load_tasks(script_args)
    model, base_state, finetuned_states = load_for_merge(script_args.pretrained, script_args.finetuned)
    if not hasattr(model, "get_text_features"):
        raise ValueError(f"'{script_args.pretrained}' has no text tower: AdaMerging needs the pretrained CLIPModel.")
    names = [script_args.pretrained, *script_args.finetuned]
    wrapper = AdaMergingCLIP(
        model,
        task_vectors(base_state, finetuned_states, names),
        script_args.init_lambda,
        script_args.granularity,
        script_args.clamp,
    )
    processor = load_processor(script_args.pretrained)
    heads = zero_shot_heads(model, processor, class_names, templates)
    num_batches = training_args.max_steps * training_args.gradient_accumulation_steps * training_args.world_size
    image_processor = getattr(processor, "image_processor", processor)
    dataset = TaskBatches(
        datasets, image_processor, training_args.per_device_train_batch_size, num_batches, seed=training_args.seed
    )
    job.record()
    args = replace(training_args, push_to_hub=False, trainable_parameters=[r"^merge_coefficients$"])
    trainer = TTATrainer(model=wrapper, args=args, train_dataset=dataset, heads=heads)
    train_from_last_checkpoint(trainer, output_dir, "AdaMerging")

    def write_outputs():
        merged = wrapper.merged_model()
        merged.config.name_or_path = ""
        merged.save_pretrained(output_dir)
        if processor is not None:
            processor.save_pretrained(output_dir)
        (output_dir / COEFFICIENTS_FILE).write_text(
            json.dumps({"tasks": list(class_names), "coefficients": wrapper.coefficients_by_key()}, indent=1) + "\n"
        )
        card = CardSpec(
            base_model=[script_args.pretrained, *script_args.finetuned],
            how_built=(
                f"**AdaMerging** (layer-wise, granularity `{script_args.granularity}`) of the vision towers of "
                f"{len(script_args.finetuned)} fine-tunes of `{script_args.pretrained}`: task-arithmetic coefficients "
                f"per layer and task (init {script_args.init_lambda}) learned by minimising the entropy of the "
                f"zero-shot predictions on the unlabeled images of {', '.join(f'`{t}`' for t in class_names)} "
                f"({trainer.state.global_step} steps); the learned coefficients are in `{COEFFICIENTS_FILE}`."
            ),
            tags=("clip", "merge", "model-merging", "adamerging"),
            description="A dense CLIP merged by AdaMerging with hf-moe: an ordinary transformers model.",
        )
        write_training_card(output_dir, training_args, card)

    return complete_job(trainer, job, training_args, write_outputs)


def main(argv: list[str] | None = None) -> Path:
    from transformers import HfArgumentParser

    from .tta import TTATrainingArguments

    parser = HfArgumentParser(
        (AdaMergingScriptArguments, TTATrainingArguments), prog="hf-moe adamerging", description=DESCRIPTION
    )
    script_args, training_args = parse_command_line(parser, argv)
    return adamerging(script_args, training_args)


if __name__ == "__main__":
    main()

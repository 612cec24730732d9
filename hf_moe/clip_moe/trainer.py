"""Trainer subclass for CLIP and CLIP-MoE: the recipe's contrastive loss plus the router balance loss. The
contrastive part is the shared `hf_moe.clip_training.CLIPTrainer`; this module adds the CLIP-MoE recipe's defaults
and router terms.

loss = CLIP contrastive loss (features all-gathered with gradient, label smoothing, fixed logit scale)
       + w_image * image balance loss + w_text * text balance loss [+ the model's z-loss terms]

with the balance-loss weights `--balance_loss_weights`:
    paper     w = each tower's `router_aux_loss_coef` (0.01): the paper's 0.01 * (image + text), independent
              of the number of processes W (the default);
    official  w_image = coef / W, w_text = coef / (2 W): what the official release's code effectively trains
              with (0.01/W and 0.005/W at the default coefficient), to reproduce its checkpoints exactly.

Only the parameters matching `trainable_parameters` train (the routers, by default; for a PEFT model pass
`hf_moe.clip_moe.lora.lora_trainable_parameters(lora_config)`). The contrastive loss, the aux loss and the
expert load of each MoE block go to the Trainer's `report_to` targets at `logging_steps`; they are accumulated
on the device in between, so logging costs no host synchronisation per step.

How each term is averaged, with k = `gradient_accumulation_steps` and W processes (tests/test_loss_scaling.py):
    contrastive      per micro-batch over the batch gathered from all processes (`hf_moe.clip_training`): weight 1;
    balance losses   per micro-batch and per process: each tower's Mixtral balance loss of THIS process' tokens
                     (padding excluded), not all-reduced; the Trainer divides the loss by k and DDP / DeepSpeed average
                     the gradients over processes, so the step takes the mean over the k x W (micro-batch, process)
                     pairs, with weight `w_image` / `w_text` above ('paper': 0.01 each at any k and W; 'official':
                     0.01/W and 0.005/W, which is the release's own scaling by W, not an accumulation artefact);
    z-loss           (`router_z_loss_coef`, 0 by default) as the balance losses.
MCL stages train a dense CLIP: the contrastive loss only.

`MCLTrainingArguments` and `CLIPMoERouterTrainingArguments` carry the official recipe's optimiser defaults
(METHODS.md section 1), so `hf-moe mcl --help` / `hf-moe train-router --help` show them.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.utils import logging

from ..clip_training import CLIPTrainer, CLIPTrainingArguments
from ..modeling import expert_load, load_balancing_loss


logger = logging.get_logger(__name__)

BALANCE_LOSS_WEIGHTS = ("paper", "official")
EXPERT_LOAD_LOGGING = ("none", "summary", "full")


@dataclass
class CLIPMoETrainingArguments(CLIPTrainingArguments):
    """`CLIPTrainingArguments` with the CLIP-MoE recipe's loss settings (label smoothing 0.1, logit scale fixed at
    100, routers only) plus its balance-loss weighting and expert-load logging."""

    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the contrastive loss."})
    logit_scale: float | None = field(
        default=100.0,
        metadata={"help": "Fixed multiplier of the cosine logits (CLIP-MoE: 100 = exp(ln 100)); unset: the model's."},
    )
    trainable_parameters: list[str] = field(
        default_factory=lambda: [r"\.router\."],
        metadata={"help": "Regexes; parameters whose name matches one train, all others are frozen."},
    )
    balance_loss_weights: Literal["paper", "official"] = field(
        default="paper",
        metadata={
            "help": "Weights of the image and text balance losses. 'paper': each tower's router_aux_loss_coef "
            "(0.01 x (image + text)), whatever the number of processes W. 'official': coef/W for image and "
            "coef/(2W) for text (0.01/W, 0.005/W), the official release's effective weights."
        },
    )
    log_expert_load: Literal["none", "summary", "full"] = field(
        default="summary",
        metadata={
            "help": "Expert-load logging at logging_steps. 'summary': per MoE block, the most and least loaded "
            "expert's share relative to an even share (expert_load/vision/block_3/max_ratio, .../min_ratio; "
            "1.0 = balanced); 'full': also every expert's share (.../block_3/expert_0); 'none': off."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        # Literal fields are only checked by the command-line parser; Python callers get the same error.
        if self.balance_loss_weights not in BALANCE_LOSS_WEIGHTS:
            raise ValueError(
                f"balance_loss_weights must be one of {BALANCE_LOSS_WEIGHTS}, got {self.balance_loss_weights!r}."
            )
        if self.log_expert_load not in EXPERT_LOAD_LOGGING:
            raise ValueError(f"log_expert_load must be one of {EXPERT_LOAD_LOGGING}, got {self.log_expert_load!r}.")


@dataclass
class MCLTrainingArguments(CLIPMoETrainingArguments):
    """The official MCL stage recipe: AdamW lr 1e-5, weight decay 0.2, 200 warm-up steps then cosine, 1 epoch,
    no gradient clipping; MLP parameters only."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (MCL: 1e-5)."})
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW weight decay (MCL: 0.2)."})
    warmup_steps: float = field(default=200, metadata={"help": "Linear warm-up steps (MCL: 200); < 1: a ratio."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warm-up (MCL: cosine)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per MCL stage (MCL: 1)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none (MCL: none)."})
    trainable_parameters: list[str] = field(
        default_factory=lambda: [r"\.mlp\."],
        metadata={"help": "MCL trains the MLPs only, so all stages share every other weight."},
    )


@dataclass
class CLIPMoERouterTrainingArguments(CLIPMoETrainingArguments):
    """The official CLIP-MoE router-training recipe: AdamW lr 1e-6, weight decay 0.01, 200 warm-up steps then
    cosine, 1 epoch, no gradient clipping; routers only."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (router training: 1e-6)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (router training: 0.01)."})
    warmup_steps: float = field(default=200, metadata={"help": "Linear warm-up steps (200); < 1: a ratio."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warm-up (cosine)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (router training: 1)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none (official: none)."})


def balance_loss_weights(setting: str, vision_coef: float, text_coef: float, world_size: int) -> tuple[float, float]:
    """The (image, text) balance-loss weights of `setting` ('paper' or 'official', see the module docstring)."""
    if setting == "paper":
        return vision_coef, text_coef
    if setting == "official":
        # The release divides the image term by W and the text term by 2W (train_moe.py / model_clipmoe.py).
        return vision_coef / world_size, text_coef / (2 * world_size)
    raise ValueError(f"balance_loss_weights must be one of {BALANCE_LOSS_WEIGHTS}, got {setting!r}.")


class CLIPMoETrainer(CLIPTrainer):
    """`CLIPTrainer` for CLIP-MoE router training and for MCL stages of a dense CLIP (no aux loss there): adds the
    model's router loss (reweighted per `--balance_loss_weights`) and logs the aux loss and expert loads.

    Expects batches from `hf_moe.data.ImageTextCollator` (`input_ids`, `attention_mask`, `pixel_values`, and an
    optional `index` that is dropped here).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Expert loads are recorded as `expert_load/{tower}`: `(num_moe_blocks, num_experts)`; the tower's blocks:
        self._load_blocks: dict[str, list[int]] = {}

    @staticmethod
    def _is_moe(config) -> bool:
        return hasattr(config, "num_local_experts")

    def _clip_outputs(self, model, inputs: dict):
        config = self.accelerator.unwrap_model(model).config
        return model(**inputs, output_router_logits=True) if self._is_moe(config) else model(**inputs)

    def _additional_loss(self, model, inputs: dict, outputs, record: bool) -> torch.Tensor | float:
        config = self.accelerator.unwrap_model(model).config
        if not self._is_moe(config):
            return 0.0
        # The model owns the router terms (per-tower balance-loss weights, z-loss).
        router_loss = outputs.router_loss + self._balance_reweighting(config, outputs, inputs.get("attention_mask"))
        if record:
            self._record("aux_loss", outputs.aux_loss)
            self._record("router_loss", router_loss)
            if self.args.log_expert_load != "none":
                self._record_expert_load(config, outputs, inputs.get("attention_mask"))
        return router_loss

    def _balance_reweighting(self, config, outputs, attention_mask) -> torch.Tensor | float:
        """What to add to the model's router loss (weighted by each tower's coefficient) so that each tower's
        balance loss carries the weight of `--balance_loss_weights` instead."""
        if self.args.balance_loss_weights == "paper":
            return 0.0
        vision, text = config.vision_config, config.text_config
        weights = balance_loss_weights(
            self.args.balance_loss_weights, vision.router_aux_loss_coef, text.router_aux_loss_coef, self.args.world_size
        )
        extra = 0.0
        for tower, weight, logits, mask in (
            (vision, weights[0], outputs.vision_router_logits, None),
            (text, weights[1], outputs.text_router_logits, attention_mask),
        ):
            if logits:
                balance = load_balancing_loss(logits, tower.num_local_experts, tower.num_experts_per_tok, mask)
                extra = extra + (weight - tower.router_aux_loss_coef) * balance
        return extra

    def _record_expert_load(self, config, outputs, attention_mask) -> None:
        for tower, tower_config, logits, mask in (
            ("vision", config.vision_config, outputs.vision_router_logits, None),
            ("text", config.text_config, outputs.text_router_logits, attention_mask),
        ):
            if not logits:
                continue
            # (num_moe_blocks, num_experts)
            self._record(f"expert_load/{tower}", expert_load(logits, tower_config.num_experts_per_tok, mask))
            self._load_blocks[tower] = tower_config.moe_layer_indices()

    def _logged_metrics(self) -> dict[str, float]:
        metrics = {}
        for name, (mean, _) in self._pop_recorded().items():
            if not name.startswith("expert_load/"):
                metrics[name] = mean
                continue
            tower = name.split("/")[1]
            for block, shares in zip(self._load_blocks[tower], mean):
                prefix = f"expert_load/{tower}/block_{block}"
                metrics[f"{prefix}/max_ratio"] = max(shares) * len(shares)
                metrics[f"{prefix}/min_ratio"] = min(shares) * len(shares)
                if self.args.log_expert_load == "full":
                    metrics.update({f"{prefix}/expert_{e}": share for e, share in enumerate(shares)})
        return metrics

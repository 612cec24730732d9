# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Mixture-of-experts building blocks shared by every hf-moe model family.

This file travels to the Hub next to the model code (``trust_remote_code``): it imports only torch and
transformers. It mirrors transformers' Mixtral MoE (router, packed experts, sparse block, balance loss)
with the pieces our families need on top: bias-carrying non-gated experts (the CLIP MLP), expert
dropout, a switch to turn off top-k renormalisation, and the balance loss computed over the tokens
of all MoE layers of a tower at once, padding excluded.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ExpertsInterface
from transformers.utils import logging

from .weight_init import initialize_weights_as_transformers_code  # noqa: F401  (its older home, re-exported)


logger = logging.get_logger(__name__)


@dataclass(kw_only=True)
class MoEConfigFields:
    """Mixture-of-experts fields shared by the configs of every hf-moe family (mixed into them).

    Args:
        num_local_experts (`int`, defaults to 4): Experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 2): Experts each token is routed to (top-k).
        moe_layers (`int` or `list[int]`, *optional*): Which blocks are MoE (`resolve_moe_layers`). `None`: all of
            them (the CLIP-MoE paper); an `int` n: the last n blocks; a list: those block indices.
        norm_topk_prob (`bool`, defaults to `True`): Renormalise the k routing weights to sum to 1.
        router_jitter_noise (`float`, defaults to 0.0): Multiplicative uniform noise on the router input,
            in training only.
        expert_dropout (`float`, defaults to 0.0): Dropout inside each expert, after the activation.
        router_aux_loss_coef (`float`, defaults to 0.01): Weight of the balance loss in the training loss.
        router_z_loss_coef (`float`, defaults to 0.0): Weight of the router z-loss (off by default).
        output_router_logits (`bool`, defaults to `False`): Return the router logits (and the aux loss).
    """

    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: int | list[int] | None = None
    norm_topk_prob: bool = True
    router_jitter_noise: float = 0.0
    expert_dropout: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False

    def validate_moe(self):
        """Raise a `ValueError` naming the offending field when the MoE fields are inconsistent."""
        if self.num_local_experts < 1:
            raise ValueError(f"num_local_experts must be at least 1, got {self.num_local_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok (top-k) must be between 1 and num_local_experts={self.num_local_experts}, "
                f"got {self.num_experts_per_tok}."
            )
        self.moe_layer_indices()  # validates moe_layers

    def moe_layer_indices(self) -> list[int]:
        """The indices of the MoE blocks, resolved from `moe_layers`."""
        return resolve_moe_layers(self.moe_layers, self.num_hidden_layers)


def resolve_moe_layers(
    moe_layers: int | list[int] | None, num_layers: int, default: list[int] | None = None
) -> list[int]:
    """Which of `num_layers` blocks are MoE, as `moe_layers` means it in every hf-moe config: `None`, the family's
    default (`default`; all blocks when not given, as CLIP-MoE and WEMoE have it); an `int` n, the last n blocks; a
    list, those block indices. Sorted, without repeats; raises a `ValueError` naming `moe_layers` when out of range."""
    if moe_layers is None:
        return list(range(num_layers)) if default is None else sorted(set(default))
    if isinstance(moe_layers, int):
        if not 0 <= moe_layers <= num_layers:
            raise ValueError(f"moe_layers={moe_layers} must be between 0 and num_hidden_layers={num_layers}.")
        return list(range(num_layers - moe_layers, num_layers))
    bad = [i for i in moe_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers holds block indices {bad} outside [0, {num_layers}).")
    return sorted(set(moe_layers))


MOE_FIELD_NAMES = [name for name in MoEConfigFields.__dataclass_fields__ if name != "moe_layers"]


class MoETopKRouter(nn.Module):
    """Bias-free linear router: fp32 softmax over all experts, top-k, optional renormalisation.

    Sizes come from `config` (`hidden_size`, `num_local_experts`, `num_experts_per_tok`, `norm_topk_prob`); a family
    whose routers each reach a subset of the experts (MoIIE's vision and language routers) gives `num_experts`,
    `top_k` and `norm_topk_prob` for each, and `config` then only needs `hidden_size`.
    """

    def __init__(
        self, config, num_experts: int | None = None, top_k: int | None = None, norm_topk_prob: bool | None = None
    ):
        super().__init__()
        self.top_k = config.num_experts_per_tok if top_k is None else top_k
        self.num_experts = config.num_local_experts if num_experts is None else num_experts
        if not 1 <= self.top_k <= self.num_experts:  # also reached by from_pretrained(..., num_experts_per_tok=k)
            raise ValueError(
                f"num_experts_per_tok={self.top_k} must be between 1 and num_local_experts={self.num_experts}."
            )
        self.norm_topk_prob = config.norm_topk_prob if norm_topk_prob is None else norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        # Routing decisions are made in fp32 whatever the model dtype: bf16 logits flip top-k choices.
        with torch.autocast(hidden_states.device.type, enabled=False):
            router_logits = F.linear(hidden_states.float(), self.weight.float())  # (num_tokens, num_experts)
        router_probs = router_logits.softmax(dim=-1)
        router_scores, router_indices = torch.topk(router_probs, self.top_k, dim=-1)  # (num_tokens, top_k)
        if self.norm_topk_prob:
            router_scores = router_scores / router_scores.sum(dim=-1, keepdim=True)
        return router_logits, router_scores, router_indices


class ActivationWithDropout(nn.Module):
    """The expert's activation followed by dropout, so every experts implementation applies both."""

    def __init__(self, hidden_act: str, dropout: float):
        super().__init__()
        self.act = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(hidden_states))


def _grouped_mm_fits(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes these experts: its kernels want every row of both operands 16-byte aligned,
    which CLIP's sizes are (768, 3072, ...) but tiny or odd widths are not ("strides should be multiple of 16
    bytes", raised by transformers' Mixtral too)."""
    row_bytes = [size * hidden_states.element_size() for size in (module.hidden_dim, module.intermediate_dim)]
    return all(size % 16 == 0 for size in row_bytes)


class MoEExpertsInterface(ExpertsInterface):
    """transformers' experts functions (the same registry), with `batched_mm` standing in where the requested one
    cannot run and batched_mm computes the same:

    - while `torch.export` traces the model (`torch.onnx.export(..., dynamo=True)` included): eager loops over the
      experts hit, a data-dependent count, and grouped_mm has no ONNX lowering;
    - grouped_mm (the default) on widths whose rows are not 16-byte aligned (see `_grouped_mm_fits`).
    """

    def get_interface(self, experts_implementation: str, default):
        requested = super().get_interface(experts_implementation, default)
        if experts_implementation not in (None, "eager", "grouped_mm"):
            return requested
        batched = super().get_interface("batched_mm", default)

        def forward(module, hidden_states, top_k_index, top_k_weights):
            if torch.compiler.is_exporting() or (
                experts_implementation != "eager" and not _grouped_mm_fits(module, hidden_states)
            ):
                return batched(module, hidden_states, top_k_index, top_k_weights)
            return requested(module, hidden_states, top_k_index, top_k_weights)

        return forward


class MoEExperts(nn.Module):
    """The eager dispatch every hf-moe packed-experts class shares; a subclass holds the packed weights, computes one
    expert on the tokens routed to it (`expert_forward`) and is decorated with `use_experts_implementation`, whose
    `batched_mm` / `grouped_mm` replace this forward when asked for.

    `forward(hidden_states (num_tokens, hidden), top_k_index (num_tokens, top_k), top_k_weights (num_tokens, top_k))`.
    """

    def expert_forward(self, expert_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # (token, choice) pairs sorted by expert, then one contiguous slice per expert that received tokens: one host
        # sync (the counts) instead of one_hot + nonzero + a torch.where per expert, and no visit to empty experts.
        num_tokens, top_k = top_k_index.shape
        if num_tokens == 0:
            return torch.zeros_like(hidden_states)
        expert_ids = top_k_index.reshape(-1)  # (num_tokens * top_k,)
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        sorted_states = hidden_states[order // top_k]  # (num_tokens * top_k, hidden_dim), grouped by expert
        outputs, start = [], 0
        for expert_idx, count in enumerate(counts):
            if count:
                outputs.append(self.expert_forward(expert_idx, sorted_states[start : start + count]))
                start += count
        # Weighted in the weights' dtype (fp32 from our routers), then rounded once to the activations' dtype.
        weighted = (torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]).to(hidden_states.dtype)
        # Back to (token, choice) order, then the k outputs of a token summed in that order: deterministic, unlike
        # index_add_ on CUDA.
        final = torch.empty_like(weighted).index_copy_(0, order, weighted)
        return final.view(num_tokens, top_k, -1).sum(dim=1)


@use_experts_implementation(has_gate=False, has_bias=True, experts_interface=MoEExpertsInterface())
class MoEMLPExperts(MoEExperts):
    """Non-gated two-layer MLP experts with biases (the CLIP / ViT MLP), packed as 3-D parameters.

    Quantization: bitsandbytes (`load_in_4bit` / `load_in_8bit`) replaces `nn.Linear` layers only, so these packed
    experts stay in the loading dtype, exactly as transformers' own packed experts (Mixtral's) do; see
    `note_packed_experts_stay_unquantized`.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.up_proj_bias = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.act_fn = ActivationWithDropout(config.hidden_act, getattr(config, "expert_dropout", 0.0))

    def expert_forward(self, expert_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.linear(hidden_states, self.up_proj[expert_idx], self.up_proj_bias[expert_idx])
        hidden_states = self.act_fn(hidden_states)
        return F.linear(hidden_states, self.down_proj[expert_idx], self.down_proj_bias[expert_idx])


@use_experts_implementation(experts_interface=MoEExpertsInterface())
class MoEGatedExperts(MoEExperts):
    """Gated MLP experts (Phi-3's, Llama's, Mixtral's MLP) packed as 3-D parameters in transformers' Mixtral layout:
    `down(up * act(gate))`, `gate_up_proj` = [gate; up] `(num_experts, 2 * intermediate, hidden)`.

    `num_experts` defaults to `config.num_local_experts`; a family whose decoder config has no MoE fields (MoIIE's
    Phi-3 / Llama text config) gives it. Quantization: as `MoEMLPExperts`.
    """

    def __init__(self, config, num_experts: int | None = None):
        super().__init__()
        self.num_experts = config.num_local_experts if num_experts is None else num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_forward(self, expert_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(hidden_states, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        return F.linear(up * self.act_fn(gate), self.down_proj[expert_idx])


def note_packed_experts_stay_unquantized(model: nn.Module) -> None:
    """Say once, when a model with packed experts is loaded with a bitsandbytes `quantization_config`, that its
    experts are not quantized. Call it from the model's `post_init` (`from_pretrained` puts the quantization config
    on the model's config before building it).

    transformers' bitsandbytes integration swaps every `nn.Linear` for a 4-/8-bit layer and has no path for 3-D
    packed experts: it leaves Mixtral's `experts.gate_up_proj` / `down_proj` in the loading dtype too, and so
    ours behave as Mixtral's. In a mixture of experts those are most of the weights, so a user expecting a
    4x smaller model is told where the memory stays.
    """
    quantization_config = getattr(model.config, "quantization_config", None)
    if isinstance(quantization_config, dict):  # as read from a pre-quantized checkpoint's config.json
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    if method != "bitsandbytes":
        return
    # Packed experts: the modules owning 3-D parameters (num_experts, out, in), biases included.
    packed = [
        param
        for module in model.modules()
        if any(param.ndim == 3 for param in module.parameters(recurse=False))
        for param in module.parameters(recurse=False)
    ]
    if not packed:
        return
    share = sum(param.numel() for param in packed) / sum(param.numel() for param in model.parameters())
    logger.warning_once(
        f"bitsandbytes quantizes nn.Linear layers only: the packed experts of {type(model).__name__} "
        f"({share:.0%} of its parameters) stay in {packed[0].dtype}, as transformers' Mixtral experts do."
    )


class MoESparseBlock(nn.Module):
    """Route every token to its top-k experts and sum their weighted outputs.

    By default one `MoETopKRouter` over `experts_class(config)`. A family with other routing (MoIIE's per-modality
    routers) passes its `routers` (registered under their names, in this order) and `experts`, and overrides `route`,
    which gets the arguments given to `forward` after the hidden states.
    """

    # Switch-Transformer jitter (False) perturbs the routing decision only; Mixtral's (True) scales the layer input
    # itself, so the experts compute on the noised tokens too.
    jitter_reaches_experts = False

    def __init__(
        self,
        config,
        experts_class: type[nn.Module] = MoEMLPExperts,
        *,
        routers: dict[str, nn.Module] | None = None,
        experts: nn.Module | None = None,
        jitter_noise: float | None = None,
    ):
        super().__init__()
        self.jitter_noise = config.router_jitter_noise if jitter_noise is None else jitter_noise
        for name, router in (routers if routers is not None else {"router": MoETopKRouter(config)}).items():
            self.add_module(name, router)
        self.experts = experts if experts is not None else experts_class(config)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(top_k_index, top_k_weights)`, each `(num_tokens, top_k)`, for `hidden_states` `(num_tokens, hidden)`."""
        _, top_k_weights, top_k_index = self.router(hidden_states)
        return top_k_index, top_k_weights

    def forward(self, hidden_states: torch.Tensor, *routing_args, **routing_kwargs) -> torch.Tensor:
        input_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, input_shape[-1])  # (num_tokens, hidden)
        router_input = hidden_states
        if self.training and self.jitter_noise > 0:
            router_input = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            if self.jitter_reaches_experts:
                hidden_states = router_input
        top_k_index, top_k_weights = self.route(router_input, *routing_args, **routing_kwargs)
        hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
        return hidden_states.reshape(input_shape)


def _token_mask(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask repeated once per MoE layer, as a float column aligned with the concatenated logits."""
    if attention_mask is None:
        return None
    mask = attention_mask.reshape(-1).to(router_logits[0].device, torch.float32)
    return mask.repeat(len(router_logits))


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    """Switch/Mixtral balance loss over the tokens of all MoE layers of a tower together.

    With p = softmax(logits), f[e] = share of (token, choice) slots routed to e summed over the k choices and
    P[e] = mean router probability of e, the loss is ``num_experts * sum_e f[e] * P[e]`` (= k when balanced).

    Args:
        router_logits: one `(batch_size * sequence_length, num_experts)` tensor per MoE layer.
        attention_mask: `(batch_size, sequence_length)`; tokens where it is 0 (padding) are excluded.
    """
    if not router_logits:
        return 0
    logits = torch.cat([layer.to(router_logits[0].device) for layer in router_logits]).float()  # (L * T, E)
    probs = logits.softmax(dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices  # (L * T, k)
    choices = F.one_hot(selected, num_experts).sum(dim=1).float()  # (L * T, E)
    mask = _token_mask(router_logits, attention_mask)
    if mask is None:
        tokens_per_expert = choices.mean(dim=0)
        router_prob_per_expert = probs.mean(dim=0)
    else:
        total = mask.sum()
        tokens_per_expert = (choices * mask[:, None]).sum(dim=0) / total
        router_prob_per_expert = (probs * mask[:, None]).sum(dim=0) / total
    return num_experts * torch.sum(tokens_per_expert * router_prob_per_expert)


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...] | None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | int:
    """ST-MoE router z-loss: mean over (non-padding) tokens of logsumexp(logits)^2."""
    if not router_logits:
        return 0
    logits = torch.cat([layer.to(router_logits[0].device) for layer in router_logits]).float()
    z = torch.logsumexp(logits, dim=-1) ** 2
    mask = _token_mask(router_logits, attention_mask)
    return z.mean() if mask is None else (z * mask).sum() / mask.sum()


def expert_load(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-layer fraction of routing slots each expert received: `(num_layers, num_experts)`, rows sum to 1."""
    loads = []
    for layer in router_logits:
        choices = F.one_hot(layer.topk(top_k, dim=-1).indices, layer.shape[-1]).sum(dim=1).float()
        if attention_mask is not None:
            choices = choices * attention_mask.reshape(-1, 1).to(choices)
        loads.append(choices.sum(dim=0) / choices.sum().clamp(min=1))
    return torch.stack(loads)


__all__ = [
    "MOE_FIELD_NAMES",
    "MoEConfigFields",
    "MoEExperts",
    "MoEExpertsInterface",
    "MoEGatedExperts",
    "MoEMLPExperts",
    "MoESparseBlock",
    "MoETopKRouter",
    "expert_load",
    "initialize_weights_as_transformers_code",
    "load_balancing_loss",
    "resolve_moe_layers",
    "router_z_loss",
]

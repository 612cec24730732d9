# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""WEMoE / E-WEMoE (weight-ensembling mixture of experts, seed 002): CLIP vision towers whose MLPs merge task
vectors per sample, theta = theta_0 + sum_i r_i tau_i, with routing weights r from a small router.

Every class subclasses its transformers CLIP counterpart and swaps the MLPs of the WEMoE blocks for `WEMoEMLP`s;
everything else is transformers' CLIP (same modules, same weight names, same forwards). A WEMoE MLP keeps the
pretrained MLP under CLIP's own names (`mlp.fc1.*`, `mlp.fc2.*`), the task vectors under `mlp.task_vectors.*` and
its router under `mlp.router.*` (E-WEMoE: one router at `encoder.router.*`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPOutput,
    CLIPTextModel,
    CLIPVisionModelOutput,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder

from .clip_towers import (
    CLIPFamilyModel,
    CLIPFamilyPreTrainedModel,
    CLIPFamilyVisionModel,
    CLIPFamilyVisionModelWithProjection,
    init_like_clip_mlp,
)
from .configuration_we_moe import WEMoEConfig, WEMoEVisionConfig


logger = logging.get_logger(__name__)

MLP_PARAMETER_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

# Tiling of the per-sample merge. Materialising a [batch, out, in] merged weight (or a [chunk, out, in] one) makes
# the merge memory-bound: every merged weight goes through DRAM twice, and slower than a per-sample loop on CPU.
# Tiles of output rows instead: one tile of the task vectors, `[E, rows, in]` (at most ~4 MiB in fp32), is read once
# and merged for SAMPLE_CHUNK samples at a time into a `[chunk, rows, in]` buffer that stays in the last-level cache
# until the batched matmul consumes it.
TASK_TILE_ELEMENTS = 1 << 20
SAMPLE_CHUNK = 16


def _tiles(num_tasks: int, out_features: int, in_features: int, batch_size: int):
    rows = max(1, min(out_features, TASK_TILE_ELEMENTS // (max(num_tasks, 8) * in_features)))
    return rows, min(SAMPLE_CHUNK, batch_size)


class PerSampleMergedLinear(torch.autograd.Function):
    r"""`y[b] = x[b] @ (W0 + sum_i r[b, i] * tau[i])^T` for every sample b of `x` (`[batch, tokens, in]`), bias
    excluded, without a Python loop over samples.

    The merged weights are built a tile of output rows and a chunk of samples at a time by ONE GEMM
    `W0[rows] + r[chunk] @ tau[:, rows]` and consumed at once by a batched matmul (see `TASK_TILE_ELEMENTS`), so
    the task vectors are read once per batch, not once per sample as in a per-sample loop. Backward recomputes
    each tile's merged weights instead of keeping them, so under autograd (test-time adaptation) nothing of size
    [batch, out, in] stays alive: the gradient w.r.t. r is `(grad_y^T x)[chunk, rows * in] @ tau[:, rows]^T`.
    """

    @staticmethod
    def forward(ctx, x, routing_weights, weight, task_vectors):
        batch_size, num_tokens, in_features = x.shape
        num_tasks, out_features = task_vectors.shape[:2]
        rows, chunk = _tiles(num_tasks, out_features, in_features, batch_size)
        r = routing_weights.to(x.dtype)
        output = x.new_empty(batch_size, num_tokens, out_features)
        # Buffers reused across tiles: fresh large allocations cost page faults on every call.
        merged_buffer = x.new_empty(chunk, rows * in_features)
        product_buffer = x.new_empty(chunk, num_tokens, rows)
        for row in range(0, out_features, rows):
            stop_row = min(row + rows, out_features)
            width = stop_row - row
            tasks_tile = task_vectors[:, row:stop_row].reshape(num_tasks, -1)
            weight_tile = weight[row:stop_row].reshape(1, -1)
            for start in range(0, batch_size, chunk):
                stop = min(start + chunk, batch_size)
                merged = merged_buffer[: stop - start, : width * in_features]
                torch.addmm(weight_tile, r[start:stop], tasks_tile, out=merged)
                product = product_buffer[: stop - start, :, :width]
                if width == out_features:
                    product = output[start:stop]
                torch.bmm(x[start:stop], merged.view(-1, width, in_features).transpose(1, 2), out=product)
                if width != out_features:
                    output[start:stop, :, row:stop_row] = product
        ctx.save_for_backward(x, routing_weights, weight, task_vectors)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, routing_weights, weight, task_vectors = ctx.saved_tensors
        need_x, need_r, need_weight, need_tasks = ctx.needs_input_grad
        batch_size, _, in_features = x.shape
        num_tasks, out_features = task_vectors.shape[:2]
        rows, chunk = _tiles(num_tasks, out_features, in_features, batch_size)
        r = routing_weights.to(x.dtype)
        grad_output = grad_output.to(x.dtype)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_r = torch.zeros_like(r) if need_r else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_tasks = torch.zeros_like(task_vectors) if need_tasks else None
        merged_buffer = x.new_empty(chunk, rows * in_features)
        grad_merged_buffer = x.new_empty(chunk, rows, in_features)
        for row in range(0, out_features, rows):
            stop_row = min(row + rows, out_features)
            width = stop_row - row
            tasks_tile = task_vectors[:, row:stop_row].reshape(num_tasks, -1)
            weight_tile = weight[row:stop_row].reshape(1, -1)
            for start in range(0, batch_size, chunk):
                stop = min(start + chunk, batch_size)
                grad_y = grad_output[start:stop, :, row:stop_row]
                if need_x:
                    merged = merged_buffer[: stop - start, : width * in_features]
                    torch.addmm(weight_tile, r[start:stop], tasks_tile, out=merged)
                    grad_x[start:stop].baddbmm_(grad_y, merged.view(-1, width, in_features))
                if need_r or need_weight or need_tasks:
                    grad_merged = grad_merged_buffer[: stop - start, :width]
                    torch.bmm(grad_y.transpose(1, 2), x[start:stop], out=grad_merged)
                    grad_merged = grad_merged.flatten(1)  # [chunk, rows * in]
                    if need_r:
                        grad_r[start:stop].addmm_(grad_merged, tasks_tile.t())
                    if need_weight:
                        grad_weight[row:stop_row] += grad_merged.sum(0).view(width, in_features)
                    if need_tasks:
                        grad_tasks[:, row:stop_row] += (r[start:stop].t() @ grad_merged).view(-1, width, in_features)
        if grad_r is not None:
            grad_r = grad_r.to(routing_weights.dtype)
        return grad_x, grad_r, grad_weight, grad_tasks


def per_sample_merged_linear(x, routing_weights, weight, task_vectors, bias=None, task_biases=None):
    """`F.linear` of each sample `x[b]` (`[batch, tokens, in]`) with its own merged parameters
    `weight + sum_i routing_weights[b, i] * task_vectors[i]` (and the same for the bias)."""
    output = PerSampleMergedLinear.apply(x, routing_weights, weight, task_vectors)
    if bias is not None:
        merged_bias = torch.addmm(bias.unsqueeze(0), routing_weights.to(task_biases.dtype), task_biases)
        output = output + merged_bias.unsqueeze(1)
    return output


class WEMoERouter(nn.Module):
    """The routing ("gate") network of a WEMoE block: per-token routing weights from the MLP input, computed in
    fp32 whatever the model dtype and NOT softmaxed (unbounded, may be negative), averaged over the tokens into
    one `(batch, num_tasks)` vector per sample (with `batch_reduce`, also over the batch).

    depth 0: a learned E-vector (ignores the input); 1: Linear(d, E); 2: Linear(d, d) -> ReLU -> Linear(d, E).
    """

    def __init__(self, config: WEMoEVisionConfig):
        super().__init__()
        self.config = config
        self.depth = config.router_depth
        self.num_tasks = config.num_tasks
        self.batch_reduce = config.batch_reduce
        hidden = config.hidden_size
        if self.depth == 0:
            self.weight = nn.Parameter(torch.empty(self.num_tasks))
        elif self.depth == 1:
            self.fc = nn.Linear(hidden, self.num_tasks)
            self.fc.router_bias_init = config.init_lambda
        else:
            self.fc1 = nn.Linear(hidden, hidden)
            self.fc1.router_bias_init = 0.0
            self.fc2 = nn.Linear(hidden, self.num_tasks)
            self.fc2.router_bias_init = config.init_lambda

    @property
    def same_for_every_sample(self) -> bool:
        """Whether every sample of a batch gets the same routing weights (one merge per batch suffices)."""
        return self.depth == 0 or self.batch_reduce

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        if self.depth == 0:
            return self.weight.float().unsqueeze(0).expand(batch_size, -1)
        with torch.autocast(hidden_states.device.type, enabled=False):
            hidden = hidden_states.float()
            if self.depth == 1:
                logits = F.linear(hidden, self.fc.weight.float(), self.fc.bias.float())
            else:
                hidden = F.relu(F.linear(hidden, self.fc1.weight.float(), self.fc1.bias.float()))
                logits = F.linear(hidden, self.fc2.weight.float(), self.fc2.bias.float())
        weights = logits.mean(dim=1)  # (batch, num_tasks): one vector per sample
        if self.batch_reduce:
            weights = weights.mean(dim=0, keepdim=True).expand(batch_size, -1)
        return weights


def _param_key(name: str) -> str:
    return name.replace(".", "_")


class DenseTaskVectors(nn.Module):
    """Task vectors stacked per MLP parameter, `[num_tasks, *shape]` (the paper's dictionary matrix)."""

    def __init__(self, config: WEMoEVisionConfig, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, _param_key(name), nn.Parameter(torch.zeros(config.num_tasks, *shape)))

    def stacked(self, name: str) -> torch.Tensor:
        return getattr(self, _param_key(name))

    @torch.no_grad()
    def fill(self, name: str, stacked: torch.Tensor) -> None:
        getattr(self, _param_key(name)).copy_(stacked)


class PrunedTaskVectors(nn.Module):
    """Magnitude-pruned task vectors, stored sparsely in a row-compressed layout: per parameter (a 1-D tensor is
    one row), the kept entries' values (`<param>_values`, `[num_tasks, kept]`), their columns (`<param>_columns`,
    int16 buffer when the rows are shorter than 2**15, else int32) and the count kept per row (`<param>_row_counts`,
    int32 buffer, `[num_tasks, rows]`), entries ordered by (row, column).

    safetensors has no sparse tensor type, and torch's sparse layouts need int64 coordinates: flat int64 or int32
    positions would cost 2-3x the values' bytes, int16 columns + per-row counts cost half (MLP rows are 768 or
    3072 long). At prune_ratio 0.9 the task vectors then take about 0.15 of their dense bytes, on disk and in
    memory alike.

    Pruning is fusion_bench's (`sparse_we_moe._magnitude_prune`): per task and tensor, the entries whose |value| is
    strictly above the `prune_ratio` quantile of |value| (torch.quantile's linear interpolation) are kept, the rest
    are zero: `n - 1 - floor(prune_ratio * (n - 1))` entries of n, about ceil(0.1 (n - 1)) at 0.9, fewer when
    magnitudes tie at the quantile. The tasks stack into tensors whose shapes follow from the config, so every task
    stores that maximum count; slots a task does not need hold explicit zeros at otherwise dropped positions, and
    the reconstructed tensor is exactly the reference's pruned task vector.
    """

    def __init__(self, config: WEMoEVisionConfig, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.prune_ratio = config.prune_ratio
        self.shapes = {name: tuple(shape) if len(shape) == 2 else (1, *shape) for name, shape in shapes.items()}
        for name, (rows, columns) in self.shapes.items():
            key = _param_key(name)
            kept = self.kept_count(config, (rows, columns))
            column_dtype = torch.int16 if columns <= torch.iinfo(torch.int16).max else torch.int32
            setattr(self, key + "_values", nn.Parameter(torch.zeros(config.num_tasks, kept)))
            self.register_buffer(key + "_columns", torch.zeros(config.num_tasks, kept, dtype=column_dtype))
            counts = torch.zeros(config.num_tasks, rows, dtype=torch.int32)
            counts[:, 0] = kept
            self.register_buffer(key + "_row_counts", counts)

    @staticmethod
    def kept_count(config: WEMoEVisionConfig, shape: tuple[int, ...]) -> int:
        """The most entries `prune` can keep in a tensor of `shape`: those above the quantile's lower rank."""
        size = torch.Size(shape).numel()
        # The quantile's rank q * (n - 1) is computed in the task vectors' dtype (fp32 here, fp64 if asked): the
        # larger of the two counts holds either.
        dtypes = (torch.float32, torch.float64)
        ranks = (torch.tensor(config.prune_ratio, dtype=dtype, device="cpu") * (size - 1) for dtype in dtypes)
        lower = min(math.floor(float(rank)) for rank in ranks)
        return max(1, size - 1 - lower)

    @staticmethod
    def prune_mask(flat: torch.Tensor, prune_ratio: float) -> torch.Tensor:
        """Per row of `flat` `[tasks, n]`, the entries kept: |value| strictly above the `prune_ratio` quantile of
        |value| (as fusion_bench's `weight.abs() > weight.abs().quantile(prune_ratio)`).

        The quantile is torch.quantile's (linear interpolation between the sorted values at floor and ceil of
        q * (n - 1), q in the tensor's dtype), taken with two `kthvalue`s: torch.quantile refuses tensors of more
        than 2**24 entries (any matrix larger than 4096 x 4096), and a full sort is not needed.
        """
        magnitudes = flat.abs()
        if not magnitudes.is_floating_point() or magnitudes.dtype in (torch.float16, torch.bfloat16):
            magnitudes = magnitudes.float()  # torch.quantile itself only takes fp32 / fp64
        size = magnitudes.shape[-1]
        rank = torch.tensor(prune_ratio, dtype=magnitudes.dtype, device="cpu") * (size - 1)
        below, above = int(rank.floor()), int(rank.ceil())
        low = magnitudes.kthvalue(below + 1, dim=-1, keepdim=True).values
        high = low if above == below else magnitudes.kthvalue(above + 1, dim=-1, keepdim=True).values
        threshold = torch.lerp(low, high, float(rank - below))
        return magnitudes > threshold

    def stacked(self, name: str) -> torch.Tensor:
        key = _param_key(name)
        values = getattr(self, key + "_values")
        columns = getattr(self, key + "_columns").long()
        counts = getattr(self, key + "_row_counts")
        num_tasks, (rows, width) = values.shape[0], self.shapes[name]
        # Global row (task * rows + row) of every kept entry, in the stored (task, row, column) order.
        global_rows = torch.repeat_interleave(
            torch.arange(num_tasks * rows, device=values.device), counts.flatten().long(), output_size=values.numel()
        )
        flat = values.new_zeros(num_tasks * rows * width)
        flat = flat.index_put((global_rows * width + columns.flatten(),), values.flatten())
        full_shape = self.shapes[name] if name.endswith("weight") else (width,)
        return flat.view(num_tasks, *full_shape)

    @torch.no_grad()
    def fill(self, name: str, stacked: torch.Tensor) -> None:
        key = _param_key(name)
        values = getattr(self, key + "_values")
        rows, width = self.shapes[name]
        flat = stacked.reshape(stacked.shape[0], -1).to(values.device)
        keep = self.prune_mask(flat, self.prune_ratio)
        if int(keep.sum(dim=1).max()) > values.shape[1]:
            raise RuntimeError(f"{name}: pruning kept more entries than the {values.shape[1]} slots stored.")
        # The kept entries are the largest by magnitude, so the top `slots` positions hold them all; the extra
        # positions (distinct, so no two entries land on one place) are stored as zeros.
        positions = flat.abs().topk(values.shape[1], dim=1).indices.sort(dim=1).values
        values.copy_(torch.where(keep.gather(1, positions), flat.gather(1, positions), 0.0))
        getattr(self, key + "_columns").copy_(positions % width)
        counts = torch.zeros(stacked.shape[0], rows, dtype=torch.int32, device=values.device)
        counts.scatter_add_(1, positions // width, torch.ones_like(positions, dtype=torch.int32))
        getattr(self, key + "_row_counts").copy_(counts)


class SVDTaskVectors(nn.Module):
    """Truncated-SVD task vectors (Twin-Merging style): each 2-D tensor as factors `<param>_u` `[E, out, rank]`
    (singular values folded in) and `<param>_v` `[E, rank, in]`; 1-D tensors (biases) dense."""

    def __init__(self, config: WEMoEVisionConfig, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        for name, shape in shapes.items():
            key = _param_key(name)
            if len(shape) == 2:
                rank = self.rank(config, shape)
                setattr(self, key + "_u", nn.Parameter(torch.zeros(config.num_tasks, shape[0], rank)))
                setattr(self, key + "_v", nn.Parameter(torch.zeros(config.num_tasks, rank, shape[1])))
            else:
                setattr(self, key, nn.Parameter(torch.zeros(config.num_tasks, *shape)))

    @staticmethod
    def rank(config: WEMoEVisionConfig, shape: tuple[int, int]) -> int:
        return max(1, round(config.svd_rank_fraction * min(shape)))

    def stacked(self, name: str) -> torch.Tensor:
        key = _param_key(name)
        if hasattr(self, key + "_u"):
            return torch.bmm(getattr(self, key + "_u"), getattr(self, key + "_v"))
        return getattr(self, key)

    @torch.no_grad()
    def fill(self, name: str, stacked: torch.Tensor) -> None:
        key = _param_key(name)
        if not hasattr(self, key + "_u"):
            getattr(self, key).copy_(stacked)
            return
        u_param, v_param = getattr(self, key + "_u"), getattr(self, key + "_v")
        rank = u_param.shape[-1]
        u, s, vh = torch.linalg.svd(stacked.float(), full_matrices=False)
        u_param.copy_(u[..., :rank] * s[:, None, :rank])
        v_param.copy_(vh[:, :rank])


TASK_VECTOR_STORAGE = {"dense": DenseTaskVectors, "pruned": PrunedTaskVectors, "svd": SVDTaskVectors}


class WEMoEMLP(nn.Module):
    """A weight-ensembling MoE MLP: the pretrained CLIP MLP (`fc1`, `fc2`) plus the task vectors stacked per
    parameter; each sample runs the CLIP MLP with its own merged parameters theta_0 + sum_i r_i tau_i, the whole
    batch at once.

    `forward(hidden_states[batch, tokens, d]) -> [batch, tokens, d]`. Pass `shared_router` for E-WEMoE (the MLP then
    holds no router of its own).
    """

    def __init__(self, config: WEMoEVisionConfig, layer_idx: int = 0, shared_router: "WEMoERouter | None" = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        shapes = {
            "fc1.weight": (config.intermediate_size, config.hidden_size),
            "fc1.bias": (config.intermediate_size,),
            "fc2.weight": (config.hidden_size, config.intermediate_size),
            "fc2.bias": (config.hidden_size,),
        }
        self.task_vectors = TASK_VECTOR_STORAGE[config.task_vector_format](config, shapes)
        if shared_router is None:
            self.router = WEMoERouter(config)
        else:
            # Not registered as a child: the encoder owns the one shared router, so its parameters appear once
            # in `parameters()` and in the checkpoint (`encoder.router.*`).
            object.__setattr__(self, "router", shared_router)

    def _merged_linear(self, hidden_states, routing_weights, linear: nn.Linear, name: str):
        tasks_weight = self.task_vectors.stacked(f"{name}.weight")
        tasks_bias = self.task_vectors.stacked(f"{name}.bias")
        if self.router.same_for_every_sample:
            # One merge serves the whole batch (depth-0 router or batch_reduce): an ordinary linear layer.
            r = routing_weights[0].to(tasks_weight.dtype)
            weight = linear.weight + torch.tensordot(r, tasks_weight, dims=1)
            bias = linear.bias + r @ tasks_bias
            return F.linear(hidden_states, weight, bias)
        return per_sample_merged_linear(
            hidden_states, routing_weights, linear.weight, tasks_weight, linear.bias, tasks_bias
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing_weights = self.router(hidden_states)  # (batch, num_tasks), fp32
        hidden_states = self._merged_linear(hidden_states, routing_weights, self.fc1, "fc1")
        hidden_states = self.activation_fn(hidden_states)
        return self._merged_linear(hidden_states, routing_weights, self.fc2, "fc2")

    @torch.no_grad()
    def load_task_vectors(self, pretrained: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]]):
        """Set the pretrained MLP (`fc1.weight`, ... keys) and store the task vectors in the configured format."""
        if len(task_vectors) != self.config.num_tasks:
            raise ValueError(f"Got {len(task_vectors)} task vectors but num_tasks={self.config.num_tasks}.")
        for name in MLP_PARAMETER_NAMES:
            target = self.get_parameter(name)
            for source, tensor in [("pretrained", pretrained.get(name))] + [
                (f"task vector {i}", tv.get(name)) for i, tv in enumerate(task_vectors)
            ]:
                if tensor is None:
                    raise KeyError(f"Layer {self.layer_idx}: {source} has no '{name}'.")
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"Layer {self.layer_idx}: {source} '{name}' has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(target.shape)}."
                    )
            target.copy_(pretrained[name])
            self.task_vectors.fill(name, torch.stack([tv[name].to(target.dtype) for tv in task_vectors]))


@dataclass
class WEMoEModelOutputWithPooling(BaseModelOutputWithPooling):
    r"""
    routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        One `(batch_size, num_tasks)` fp32 tensor of per-sample routing weights per WEMoE block.
    """

    routing_weights: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class WEMoEVisionModelOutput(CLIPVisionModelOutput):
    r"""
    routing_weights (`tuple(torch.FloatTensor)`, *optional*): Per-sample routing weights per WEMoE block.
    """

    routing_weights: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class WEMoEOutput(CLIPOutput):
    r"""
    routing_weights (`tuple(torch.FloatTensor)`, *optional*): The vision tower's per-sample routing weights per
        WEMoE block, returned when `output_routing_weights=True`.
    """

    routing_weights: tuple[torch.FloatTensor, ...] | None = None


class WEMoEEncoderLayer(CLIPEncoderLayer):
    """transformers' CLIP encoder layer, its MLP a `WEMoEMLP` when `layer_idx` is a WEMoE block."""

    def __init__(self, config: WEMoEVisionConfig, layer_idx: int, shared_router: WEMoERouter | None = None):
        super().__init__(config)
        if layer_idx in config.moe_layer_indices():
            self.mlp = WEMoEMLP(config, layer_idx, shared_router=shared_router)


class WEMoEEncoder(CLIPEncoder):
    """transformers' CLIP encoder (its forward) over `WEMoEEncoderLayer`s; E-WEMoE's shared router lives here."""

    def __init__(self, config: WEMoEVisionConfig):
        # Not `CLIPEncoder.__init__`: it would allocate and initialise a whole dense stack only to drop it.
        nn.Module.__init__(self)
        config.validate_we_moe()  # fields may have been set after the config was built
        self.config = config
        if config.shared_router:
            self.router = WEMoERouter(config)
        shared = self.router if config.shared_router else None
        self.layers = nn.ModuleList(
            [WEMoEEncoderLayer(config, i, shared_router=shared) for i in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False


class WEMoEPreTrainedModel(CLIPFamilyPreTrainedModel):
    config: WEMoEConfig
    config_class = WEMoEConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "WEMoEEncoderLayer", "CLIPVisionEmbeddings"]
    supports_gradient_checkpointing = True
    _can_record_outputs = {
        "hidden_states": CLIPEncoderLayer,
        "attentions": CLIPAttention,
        "routing_weights": OutputRecorder(WEMoERouter),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # WEMoE has no packed experts: the argument every hf-moe family takes is accepted (and ignored, with a note).
        return True

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        if experts_implementation is not None:
            logger.warning_once(
                f"WEMoE has no packed experts (its MLPs merge task vectors per sample): "
                f"experts_implementation={experts_implementation!r} is accepted and changes nothing."
            )
        return super()._check_and_adjust_experts_implementation(experts_implementation)

    @torch.no_grad()
    def _init_weights(self, module):
        if hasattr(module, "router_bias_init"):
            # A router layer (METHODS.md): weight ~ N(0, 0.01); the output layer's bias init_lambda, so every task
            # starts at init_lambda. Decided here, on the layer itself: the generic nn.Linear init would zero the
            # bias and mark it initialised before the router module is visited.
            init.normal_(module.weight, std=0.01)
            init.constant_(module.bias, module.router_bias_init)
            return
        super()._init_weights(module)  # CLIP's own modules and logit_scale
        if isinstance(module, WEMoEMLP):
            # The pretrained MLP like transformers' CLIPMLP; zero task vectors make a fresh model the dense CLIP.
            mlp = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
            init_like_clip_mlp(module.config, self.config.initializer_factor, *mlp)
        elif isinstance(module, (DenseTaskVectors, SVDTaskVectors, PrunedTaskVectors)):
            for param in module.parameters(recurse=False):
                init.zeros_(param)
        elif isinstance(module, WEMoERouter) and module.depth == 0:
            init.constant_(module.weight, module.config.init_lambda)


def _load_tower_task_vectors(tower, pretrained_mlps, task_vectors):
    if len(task_vectors) != tower.config.num_tasks:
        raise ValueError(f"Got {len(task_vectors)} task vectors but num_tasks={tower.config.num_tasks}.")
    for i, layer in enumerate(tower.encoder.layers):
        if not isinstance(layer.mlp, WEMoEMLP):
            continue
        prefix = f"encoder.layers.{i}.mlp."
        for source in [pretrained_mlps, *task_vectors]:
            missing = [prefix + name for name in MLP_PARAMETER_NAMES if prefix + name not in source]
            if missing:
                raise KeyError(f"Missing MLP tensors {missing}.")
        layer.mlp.load_task_vectors(
            {name: pretrained_mlps[prefix + name] for name in MLP_PARAMETER_NAMES},
            [{name: tv[prefix + name] for name in MLP_PARAMETER_NAMES} for tv in task_vectors],
        )


class WEMoECLIPVisionModel(WEMoEPreTrainedModel, CLIPFamilyVisionModel):
    """The WEMoE vision tower without projection: transformers' `CLIPVisionModel` with WEMoE MLPs.

    `from_pretrained` also takes a folder holding a whole `WEMoECLIPModel` and loads its vision tower.
    """

    config: WEMoEVisionConfig
    config_class = WEMoEVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"
    encoder_class = WEMoEEncoder
    output_class = WEMoEModelOutputWithPooling

    def load_task_vectors(
        self, pretrained_mlps: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]]
    ) -> None:
        """Fill every WEMoE block from dense weights: `pretrained_mlps` and each task vector map keys
        `encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}` (relative to this tower) to tensors; the task vectors are
        stored in `config.task_vector_format` (pruned / SVD-compressed here)."""
        _load_tower_task_vectors(self, pretrained_mlps, task_vectors)


class WEMoECLIPVisionModelWithProjection(WEMoEPreTrainedModel, CLIPFamilyVisionModelWithProjection):
    """WEMoE vision tower with its projection (transformers' `CLIPVisionModelWithProjection` with WEMoE MLPs)."""

    config: WEMoEVisionConfig
    config_class = WEMoEVisionConfig
    main_input_name = "pixel_values"
    vision_model_class = WEMoECLIPVisionModel

    def load_task_vectors(
        self, pretrained_mlps: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]]
    ) -> None:
        """See `WEMoECLIPVisionModel.load_task_vectors` (keys relative to the vision tower)."""
        self.vision_model.load_task_vectors(pretrained_mlps, task_vectors)

    @can_return_tuple
    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs) -> WEMoEVisionModelOutput:
        # Our own forward: transformers' builds its output from a fixed list of the tower's fields, which drops
        # the routing weights.
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        return WEMoEVisionModelOutput(
            image_embeds=self.visual_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing_weights=outputs.routing_weights,
        )


class WEMoECLIPModel(WEMoEPreTrainedModel, CLIPFamilyModel):
    """CLIP with a WEMoE vision tower and the pretrained CLIP text tower: transformers' `CLIPModel` (its
    `get_text_features`, `get_image_features`, zero-shot classification) plus the routing weights.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("zero-shot-image-classification", model="path/to/we-moe", trust_remote_code=True)
    >>> classifier(image, candidate_labels=["a photo of a cat", "a photo of a dog"])
    ```"""

    # The text tower is transformers' CLIP, without experts: an experts implementation asked for the joint model
    # (which WEMoE accepts and ignores) must not reach it, where `grouped_mm` would be refused.
    text_model_class = CLIPTextModel
    text_model_kwargs = {"experts_implementation": None}
    vision_model_class = WEMoECLIPVisionModel

    def load_task_vectors(
        self, pretrained_mlps: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]]
    ) -> None:
        """See `WEMoECLIPVisionModel.load_task_vectors` (keys relative to the vision tower)."""
        self.vision_model.load_task_vectors(pretrained_mlps, task_vectors)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_routing_weights: bool | None = None,
        **kwargs,
    ) -> WEMoEOutput:
        r"""
        output_routing_weights (`bool`, *optional*): Return the vision tower's routing weights; by default the
            vision config's `output_routing_weights`.
        """
        if output_routing_weights is not None:
            # Reaches both towers; the plain CLIP text tower records nothing for it.
            kwargs["output_routing_weights"] = output_routing_weights
        outputs = self.clip_forward(
            input_ids, pixel_values, attention_mask, position_ids, return_loss, interpolate_pos_encoding, **kwargs
        )
        return WEMoEOutput(**outputs, routing_weights=outputs.vision_model_output.routing_weights)


# Saved folders carry this file, the configuration and the sibling files they import (clip_towers.py, ...), so
# `trust_remote_code=True` loads them anywhere.
WEMoEConfig.register_for_auto_class()
WEMoEVisionConfig.register_for_auto_class()
WEMoECLIPModel.register_for_auto_class("AutoModel")
WEMoECLIPVisionModel.register_for_auto_class("AutoModel")

__all__ = [
    "PerSampleMergedLinear",
    "WEMoECLIPModel",
    "WEMoECLIPVisionModel",
    "WEMoECLIPVisionModelWithProjection",
    "WEMoEEncoder",
    "WEMoEEncoderLayer",
    "WEMoEMLP",
    "WEMoEModelOutputWithPooling",
    "WEMoEOutput",
    "WEMoEPreTrainedModel",
    "WEMoERouter",
    "WEMoEVisionModelOutput",
    "per_sample_merged_linear",
]

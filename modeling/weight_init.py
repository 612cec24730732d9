# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""Weight initialisation as transformers runs it for its own models, shared by every hf-moe family.

This file travels to the Hub next to the model code of every family (MoDE's too, which has no MoE layers and so
no moe.py): it imports only torch and transformers.
"""

import torch
from torch import nn
from transformers import initialization as init


def initialize_weights_as_transformers_code(model: nn.Module) -> None:
    """`PreTrainedModel.initialize_weights` as transformers runs it for its own models: every module (sub-models with
    their own `_init_weights`) after its children, skipping what is flagged `_is_hf_initialized` (loaded weights).

    transformers runs it differently for code outside its package (ours): a module whose own parameters are all
    flagged counts as initialised. Containers without parameters of their own (CLIP's attention and MLP) then count
    as done before their `_init_weights` ran, and CLIP initialises their projections from there: fresh models and
    weights missing from a checkpoint got the generic N(0, 0.02) instead of CLIP's init. Our `_init_weights` only
    write through `transformers.initialization`, which honours the per-tensor flags, so the heuristic is not needed.
    `InitializeAsTransformersMixin` calls it from `initialize_weights`.
    """
    from transformers import PreTrainedModel

    def visit(module: nn.Module, initialize) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialize)
        initialize(module, is_custom_code=False)

    visit(model, model._initialize_weights)


class InitializeAsTransformersMixin:
    """Put before the `PreTrainedModel` base: `initialize_weights` (fresh models, weights missing from a checkpoint)
    runs as transformers runs it for its own models (see `initialize_weights_as_transformers_code`)."""

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        initialize_weights_as_transformers_code(self)


__all__ = ["InitializeAsTransformersMixin", "initialize_weights_as_transformers_code"]

"""Training helpers shared by every family's Trainer subclasses."""

import re

import torch


def freeze_all_but(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Make exactly the parameters whose name matches one of `patterns` trainable; return their names."""
    regexes = [re.compile(pattern) for pattern in patterns]
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(regex.search(name) for regex in regexes))
        if parameter.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"No parameter name matches trainable_parameters={patterns}.")
    return trainable

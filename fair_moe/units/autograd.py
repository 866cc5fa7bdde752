"""Calibration passes that need activation gradients only, shared by every unit kind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def activation_gradients_only(model: nn.Module, entry: nn.Module | None = None) -> Iterator[None]:
    """Freeze parameters and make ``entry``'s output (default: the input embeddings) require grad, so that a
    backward pass reaches every activation after it and stores no parameter gradient. Restored on exit."""
    entry = entry if entry is not None else model.get_input_embeddings()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    handle = entry.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)

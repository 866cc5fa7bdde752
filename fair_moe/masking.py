"""The reference every pruned model must equal: the original with removed experts unreachable.

Inside ``masked_experts`` each router's real logits are kept and the top-k weights and ids are
recomputed the way the family's router computes them, with the removed experts' logits (and, for
routers with a selection bias, their selection scores) at -inf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fair_moe.adapters import get_adapter


@contextlib.contextmanager
def masked_experts(model: nn.Module, kept: dict[int, list[int]]) -> Iterator[None]:
    """Make every expert not in ``kept[layer index]`` unreachable for the duration of the block."""
    adapter = get_adapter(model.config)
    handles = []
    try:
        for layer in adapter.moe_layers(model):
            if layer.index not in kept:
                continue
            removed = torch.ones(layer.num_experts, dtype=torch.bool)
            removed[list(kept[layer.index])] = False
            handles.append(layer.router.register_forward_hook(_mask_hook(adapter, removed)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mask_hook(adapter, removed: torch.Tensor):
    def hook(router, args, output):
        logits = adapter.router_logits(output)
        weights, ids = adapter.route(router, logits, removed)
        return adapter.replace_router_output(output, logits, weights, ids)

    return hook

"""The reference every pruned model must equal: the original with removed experts unreachable.

Inside ``masked_experts`` each router's real logits are kept and the top-k weights and ids are
recomputed the way the family's router computes them, with the removed experts' logits (and, for
routers with a selection bias, their selection scores) at -inf. With ``scales`` the routed-experts
output of a layer is multiplied by its scale — the reference for a plan with a layer-scale
compensation folded into its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fair_moe.adapters import get_adapter


@contextlib.contextmanager
def masked_experts(
    model: nn.Module, kept: dict[int, list[int]], scales: dict[int, float] | None = None, keep_unmasked: bool = False,
    temperatures: dict[int, float] | None = None,
) -> Iterator[None]:
    """Make every expert not in ``kept[layer index]`` unreachable for the duration of the block.

    ``temperatures`` multiplies a layer's router logits (the reference for a router-temperature
    compensation folded into the router weights). ``keep_unmasked`` leaves the router's own (unmasked)
    top-k weights and ids on ``router.fair_moe_unmasked`` and its logits on ``router.fair_moe_logits``
    after each call, for fitting compensations.
    """
    adapter = get_adapter(model.config)
    handles = []
    try:
        for layer in adapter.moe_layers(model):
            if layer.index not in kept:
                continue
            removed = torch.ones(layer.num_experts, dtype=torch.bool)
            removed[list(kept[layer.index])] = False
            temperature = (temperatures or {}).get(layer.index)
            handles.append(layer.router.register_forward_hook(_mask_hook(adapter, removed, keep_unmasked, temperature)))
            if scales and layer.index in scales:
                handles.append(layer.experts.register_forward_hook(_scale_hook(scales[layer.index])))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in adapter.moe_layers(model):
            layer.router.__dict__.pop("fair_moe_unmasked", None)
            layer.router.__dict__.pop("fair_moe_logits", None)


def _mask_hook(adapter, removed: torch.Tensor, keep_unmasked: bool, temperature: float | None = None):
    def hook(router, args, output):
        logits = adapter.router_logits(output)
        if keep_unmasked:
            router.fair_moe_unmasked = adapter.route(router, logits, None)
            router.fair_moe_logits = (logits, removed)
        if temperature is not None:
            logits = logits * temperature
        weights, ids = adapter.route(router, logits, removed)
        return adapter.replace_router_output(output, logits, weights, ids)

    return hook


def _scale_hook(scale: float):
    def hook(module, args, output):
        return output * scale

    return hook

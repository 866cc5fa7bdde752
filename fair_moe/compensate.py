"""Compensation that keeps the stock architecture: one output scale per MoE layer, folded into weights.

Removing experts shrinks a layer's routed output where the removed experts used to carry weight
(when the router does not renormalise) and shifts it elsewhere. ``layer-scale`` fits, per layer, the
scalar s minimising Σ_t ‖y_t − s·ŷ_t‖² between the routed-experts output y of the original routing and
ŷ of the pruned routing, on the same inputs (the pruned model's own activations, in one pass over
calibration windows): s = Σ⟨y, ŷ⟩ / Σ‖ŷ‖². It is folded into every kept expert's down projection
(and its bias), so the rewritten model equals the masked original with each layer's routed output
multiplied by s — the reference the tests hold it to. The plan records every s.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from fair_moe.adapters import get_adapter
from fair_moe.masking import masked_experts
from fair_moe.signals.collect import restore_forward
from fair_moe.signals.layerwise import execution_device

COMPENSATIONS = ("none", "layer-scale", "router-temperature")
TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)


@torch.no_grad()
def fit_layer_scales(model: nn.Module, kept: dict[int, list[int]], input_ids: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per-layer least-squares scale of the pruned routed output onto the original one."""
    adapter = get_adapter(model.config)
    layers = [layer for layer in adapter.moe_layers(model) if layer.index in kept]
    sums = {layer.index: [0.0, 0.0] for layer in layers}  # Σ⟨y, ŷ⟩, Σ‖ŷ‖²
    device = execution_device(model)
    with masked_experts(model, kept, keep_unmasked=True), contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(_recording(layer, sums[layer.index]))
        for i in range(0, len(input_ids), batch_size):
            model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)
    return {index: (xy / yy if yy > 0 else 1.0) for index, (xy, yy) in sums.items()}


@contextlib.contextmanager
def _recording(layer, acc: list[float]):
    experts, router = layer.experts, layer.router
    original = experts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        pruned = original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        weights, ids = router.fair_moe_unmasked
        full = original(hidden_states, ids, weights.to(top_k_weights.dtype), *args, **kwargs)
        acc[0] += (full.double() * pruned.double()).sum().item()
        acc[1] += (pruned.double() ** 2).sum().item()
        return pruned

    previous = experts.__dict__.get("forward")
    experts.forward = types.MethodType(forward, experts)
    try:
        yield
    finally:
        restore_forward(experts, previous)


@torch.no_grad()
def fit_router_temperatures(model: nn.Module, kept: dict[int, list[int]], input_ids: torch.Tensor,
                            batch_size: int = 4, grid: tuple[float, ...] = TEMPERATURES) -> dict[int, float]:
    """Per layer, the router temperature t (logits × t) from ``grid`` whose pruned routed output is closest
    (Σ‖y − ŷ_t‖²) to the original routing's output on the same inputs [ours; router re-calibration that
    folds into the router weights]. A layer that keeps every expert gets t = 1 (its error is 0 there)."""
    adapter = get_adapter(model.config)
    layers = [layer for layer in adapter.moe_layers(model) if layer.index in kept]
    errors = {layer.index: torch.zeros(len(grid), dtype=torch.float64) for layer in layers}
    device = execution_device(model)
    with masked_experts(model, kept, keep_unmasked=True), contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(_temperature_recording(adapter, layer, errors[layer.index], grid))
        for i in range(0, len(input_ids), batch_size):
            model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)
    return {index: float(grid[int(torch.argmin(err))]) for index, err in errors.items()}


@contextlib.contextmanager
def _temperature_recording(adapter, layer, errors: torch.Tensor, grid: tuple[float, ...]):
    experts, router = layer.experts, layer.router
    original = experts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        pruned = original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        weights, ids = router.fair_moe_unmasked
        full = original(hidden_states, ids, weights.to(top_k_weights.dtype), *args, **kwargs).double()
        logits, removed = router.fair_moe_logits
        for n, t in enumerate(grid):
            w, i = adapter.route(router, logits * t, removed)
            errors[n] += ((full - original(hidden_states, i, w.to(top_k_weights.dtype), *args, **kwargs).double()) ** 2).sum().item()
        return pruned

    previous = experts.__dict__.get("forward")
    experts.forward = types.MethodType(forward, experts)
    try:
        yield
    finally:
        restore_forward(experts, previous)


@torch.no_grad()
def fold_router_temperatures(model: nn.Module, temperatures: dict[int, float]) -> None:
    """Multiply layer l's router weight (and router bias, not a selection bias) by temperatures[l]."""
    for layer in get_adapter(model.config).moe_layers(model):
        if layer.index in temperatures:
            for name, tensor in layer.router.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    tensor.mul_(temperatures[layer.index])


@torch.no_grad()
def fold_layer_scales(model: nn.Module, scales: dict[int, float]) -> None:
    """Multiply every expert's down projection (and down-projection bias) of layer l by scales[l]."""
    for layer in get_adapter(model.config).moe_layers(model):
        if layer.index not in scales:
            continue
        for name, tensor in layer.experts.named_parameters(recurse=False):
            if name.startswith("down_proj"):
                tensor.mul_(scales[layer.index])

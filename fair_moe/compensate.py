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

import torch
from torch import nn

from fair_moe.adapters import get_adapter
from fair_moe.masking import masked_experts
from fair_moe.signals.collect import patched_forward
from fair_moe.signals.layerwise import execution_device

COMPENSATIONS = ("none", "layer-scale", "router-temperature", "merge")
TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)


def _forward_all(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> None:
    """Run the model over ``input_ids [n, seq]`` in batches, outputs discarded (the recorders keep what they need)."""
    device = execution_device(model)
    for i in range(0, len(input_ids), batch_size):
        model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)


@torch.no_grad()
def fit_layer_scales(model: nn.Module, kept: dict[int, list[int]], input_ids: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per-layer least-squares scale of the pruned routed output onto the original one."""
    adapter = get_adapter(model.config)
    layers = [layer for layer in adapter.moe_layers(model) if layer.index in kept]
    sums = {layer.index: [0.0, 0.0] for layer in layers}  # Σ⟨y, ŷ⟩, Σ‖ŷ‖²
    with masked_experts(model, kept, keep_unmasked=True), contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(_recording(layer, sums[layer.index]))
        _forward_all(model, input_ids, batch_size)
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

    with patched_forward(experts, forward):
        yield


@torch.no_grad()
def fit_router_temperatures(model: nn.Module, kept: dict[int, list[int]], input_ids: torch.Tensor,
                            batch_size: int = 4, grid: tuple[float, ...] = TEMPERATURES) -> dict[int, float]:
    """Per layer, the router temperature t (logits × t) from ``grid`` whose pruned routed output is closest
    (Σ‖y − ŷ_t‖²) to the original routing's output on the same inputs [ours; router re-calibration that
    folds into the router weights]. A layer that keeps every expert gets t = 1 (its error is 0 there)."""
    adapter = get_adapter(model.config)
    layers = [layer for layer in adapter.moe_layers(model) if layer.index in kept]
    errors = {layer.index: torch.zeros(len(grid), dtype=torch.float64) for layer in layers}
    with masked_experts(model, kept, keep_unmasked=True), contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(_temperature_recording(adapter, layer, errors[layer.index], grid))
        _forward_all(model, input_ids, batch_size)
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

    with patched_forward(experts, forward):
        yield


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


@torch.no_grad()
def fit_merges(model: nn.Module, kept: dict[int, list[int]], input_ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Which kept expert each removed expert merges into, and with what weights [ours, after HC-SMoE].

    One pass of the original model collects every expert's mean output over the tokens routed to it
    and how many there were; a removed expert merges into the kept expert whose mean output is most
    similar (cosine), and a kept expert's tensors become the routed-token-weighted average of its own
    and its merged experts' tensors. Experts no token reached merge nowhere.
    Returns {layer: {kept id: [[expert id, weight], ...] (its own id first)}}.
    """
    adapter = get_adapter(model.config)
    layers = [layer for layer in adapter.moe_layers(model) if layer.index in kept]
    sums = {layer.index: [torch.zeros(layer.num_experts, dtype=torch.float64), None] for layer in layers}
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(_mean_outputs(layer, sums[layer.index]))
        _forward_all(model, input_ids, batch_size)
    merges = {}
    for layer in layers:
        counts, total = sums[layer.index]
        keep = list(kept[layer.index])
        groups = {k: [[k, float(counts[k])]] for k in keep}
        if total is not None:
            means = torch.nn.functional.normalize(total / counts.clamp_min(1)[:, None], dim=-1)
            live_kept = [k for k in keep if counts[k] > 0]
            for e in sorted(set(range(layer.num_experts)) - set(keep)):
                if counts[e] > 0 and live_kept:
                    target = max(live_kept, key=lambda k: (float(means[e] @ means[k]), -k))
                    groups[target].append([e, float(counts[e])])
        merges[layer.index] = {k: members for k, members in groups.items() if len(members) > 1}
    return merges


@contextlib.contextmanager
def _mean_outputs(layer, acc: list):
    """Accumulate per-expert routed-token counts and output sums [E, H] while the layer runs as usual."""
    experts = layer.experts
    original = experts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        flat = top_k_index.reshape(-1)
        valid = (flat >= 0) & (flat < layer.num_experts)
        token = torch.arange(top_k_index.shape[0], device=flat.device).repeat_interleave(top_k_index.shape[1])[valid]
        ids = flat[valid]
        outputs = original(hidden_states[token], ids[:, None],
                           torch.ones((len(ids), 1), dtype=top_k_weights.dtype, device=top_k_weights.device)).double().cpu()
        if acc[1] is None:
            acc[1] = torch.zeros(layer.num_experts, outputs.shape[-1], dtype=torch.float64)
        acc[0].index_add_(0, ids.cpu(), torch.ones(len(ids), dtype=torch.float64))
        acc[1].index_add_(0, ids.cpu(), outputs)
        return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    with patched_forward(experts, forward):
        yield


@torch.no_grad()
def fold_merges(model: nn.Module, merges: dict) -> None:
    """Replace each receiving expert's tensors by the weighted average of its group (before slicing).

    Idempotent per model: a second call on the same model does nothing.
    """
    if getattr(model, "_fair_moe_merged", False):
        return
    from fair_moe.rewrite import expert_tensor_names

    for layer in get_adapter(model.config).moe_layers(model):
        groups = merges.get(layer.index) or merges.get(str(layer.index)) or {}
        for name in expert_tensor_names(layer.experts, layer.num_experts):
            tensor = getattr(layer.experts, name)
            for target, members in groups.items():
                ids = torch.tensor([int(m[0]) for m in members])
                weights = torch.tensor([float(m[1]) for m in members], dtype=torch.float64)
                weights = weights / weights.sum()
                mixed = (tensor[ids].double() * weights.view(-1, *[1] * (tensor.dim() - 1))).sum(0)
                tensor[int(target)] = mixed.to(tensor.dtype)
    model._fair_moe_merged = True

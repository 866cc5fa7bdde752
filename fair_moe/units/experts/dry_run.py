"""``--dry-run``: what a budget does to a MoE model, from its config alone (weights on the meta device)."""

from __future__ import annotations

import torch

from fair_moe.adapters.base import FusedExpertsAdapter
from fair_moe.adapters.structure import text_config
from fair_moe.core.budget import Budget, UnitLayout


def meta_model(config, trust_remote_code: bool = False):
    """The model built on the meta device with its own Auto class: shapes without memory."""
    from fair_moe.adapters import get_adapter
    from fair_moe.adapters.structure import meta_model as build

    return build(config, get_adapter(config).auto_class(config), trust_remote_code)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def calibration_memory_estimate(config, adapter: FusedExpertsAdapter, top_k: int, tokens: int, dtype_bytes: int,
                                weight_bytes: int) -> int:
    """Rough peak bytes of one calibration step: weights + activations kept for backward + logits.

    Per token and layer the backward keeps about 8·H (norms, residual, attention in/out), the shared
    or dense MLP's 3·I, and for each of the top_k routed experts 3·I_moe + H; the logits and their
    gradient are float32 [tokens, vocab].
    """
    text = text_config(config)
    h = text.hidden_size
    per_token_layer = (8 * h + 3 * adapter.shared_intermediate_size(config)
                       + top_k * (3 * adapter.expert_intermediate_size(config) + h))
    activations = tokens * text.num_hidden_layers * per_token_layer * dtype_bytes
    logits = tokens * text.vocab_size * 4 * 2
    return weight_bytes + activations + logits


def describe(config, adapter: FusedExpertsAdapter, layout: UnitLayout, budgets: tuple[Budget, ...],
             dtype: torch.dtype, batch_tokens: int, trust_remote_code: bool = False) -> list[str]:
    """Layout, parameters before / after every budget, size on disk and calibration memory."""
    model = meta_model(config, trust_remote_code)
    layers = adapter.moe_layers(model)
    moe = {layer.index for layer in layers}
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p[0].numel() for p in layers[0].experts.parameters()) if layers else 0
    router_row = sum(t[0].numel() for t in layers[0].router.parameters()) if layers else 0
    bytes_per = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    grouped = layout.groups > 1
    whole = set(layout.whole)

    def kind(i: int) -> str:
        return "moe" if i in moe else "whole" if i in whole else "dense"

    lines = [
        "layer  kind   routed experts  top_k" + ("  groups" if grouped else ""),
        *[f"{i:5d}  {kind(i):5s}  {layout.width if kind(i) != 'dense' else 0:14d}  {layout.floor:5d}"
          + (f"  {layout.groups:6d}" if grouped else "") for i in range(text_config(config).num_hidden_layers)],
        f"parameters: {total / 1e9:.3f} B in all, {per_expert * layout.width * len(layers) / 1e9:.3f} B in "
        f"{layout.width * len(layers)} routed experts it may prune ({per_expert / 1e6:.2f} M each); "
        f"{_gib(total * bytes_per)} on disk in {str(dtype).replace('torch.', '')}",
    ]
    for budget in budgets:
        if budget.fraction is None:
            continue
        removed = budget.removed_per_layer(layout.width, layout.groups) * len(layers)
        after = total - removed * (per_expert + router_row)
        lines.append(
            f"after --budget {budget.fraction}: {removed} experts removed, {after / 1e9:.3f} B parameters "
            f"({100 * (1 - after / total):.1f}% fewer), {_gib(after * bytes_per)} on disk"
        )
    estimate = calibration_memory_estimate(config, adapter, layout.floor, batch_tokens, bytes_per, total * bytes_per)
    lines.append(f"calibration memory estimate (batch of {batch_tokens} tokens, forward + backward): {_gib(estimate)}")
    return lines

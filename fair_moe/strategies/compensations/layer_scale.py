"""``layer-scale``: one output scale per MoE layer, folded into the kept experts' down projections [ours].

Removing experts shrinks a layer's routed output where the removed experts used to carry weight (when
the router does not renormalise) and shifts it elsewhere. Per layer, the scalar s minimising
Σ_t ‖y_t − s·ŷ_t‖² between the routed-experts output y under the original routing and ŷ under the pruned
routing, on the same inputs (the pruned model's own activations, one pass over calibration windows):
s = Σ⟨y, ŷ⟩ / Σ‖ŷ‖². Folded into every kept expert's down projection (and its bias), so the checkpoint
keeps the stock architecture and equals the masked original with each layer's routed output × s.
"""

from __future__ import annotations

import contextlib

from fair_moe.core.lazy import lazy_module
from fair_moe.core.plan import CompensationRecord
from fair_moe.strategies.compensations.base import (
    COMPENSATIONS,
    Compensation,
    forward_all,
    scale_in_place,
    scaling_transform,
)

torch = lazy_module("torch")


@COMPENSATIONS.register
class LayerScale(Compensation):
    name = "layer-scale"
    description = "a least-squares output scale per MoE layer, folded into the kept experts' down projections"
    changes = ("each MoE layer's kept experts' down projections (and their biases) were multiplied by that layer's "
               "scale s (fitted by least squares so the pruned routed output matches the original one)")
    auto_candidate = True
    writes = "expert-scale"

    def unavailable(self, model):
        from fair_moe.adapters import get_adapter

        adapter = get_adapter(model.config)
        if adapter.output_norm:
            return (f"each MoE layer's experts output goes straight into {adapter.output_norm}, an RMS norm, which "
                    "undoes any scale of it")
        for layer in adapter.moe_layers(model):
            if layer.structure.experts_tail:
                return (f"{layer.experts.__class__.__name__} also computes {layer.structure.experts_tail} "
                        "zero-computation experts whose output does not pass through a down projection")
            inner = [name for name, child in layer.experts.named_children() if any(True for _ in child.parameters())]
            if inner:
                return (f"each expert's output passes through {layer.experts.__class__.__name__}.{inner[0]} after "
                        "the down projection, so a scale folded into the down projection would not reach the output")
        return None

    def fit(self, model, kept, data):
        from fair_moe.units.experts.routing import masked_experts

        sums: dict[int, list[float]] = {index: [0.0, 0.0] for index in kept}  # Σ⟨y, ŷ⟩, Σ‖ŷ‖²

        def tap(call):
            pruned = call.output()
            full = call.unmasked_output()
            acc = sums[call.layer.index]
            acc[0] += (full.double() * pruned.double()).sum().item()
            acc[1] += (pruned.double() ** 2).sum().item()
            return pruned

        with torch.no_grad(), masked_experts(model, kept, tap):
            forward_all(model, data.windows, data.batch_size)
        scales = {index: (xy / yy if yy > 0 else 1.0) for index, (xy, yy) in sums.items()}
        return CompensationRecord(self.name, scales, {"fit_windows": len(data.windows)})

    @contextlib.contextmanager
    def reference(self, model, record):
        from fair_moe.adapters import get_adapter

        with contextlib.ExitStack() as stack:
            for layer in get_adapter(model.config).moe_layers(model):
                if layer.index in record.per_layer:
                    scale = float(record.per_layer[layer.index])
                    handle = layer.experts.register_forward_hook(lambda m, a, out, s=scale: out * s)
                    stack.callback(handle.remove)
            yield

    def fold(self, model, record):
        scale_in_place(model, record.per_layer, "experts", _down_projection)

    def transform(self, model, record):
        return scaling_transform(model, record.per_layer, "experts", _down_projection)

    def summary(self, record):
        return "layer scales (folded into kept experts): " + ", ".join(
            f"{k}: {float(v):.4f}" for k, v in sorted(record.per_layer.items()))


def _down_projection(adapter, config, name: str) -> bool:
    return adapter.is_down_projection(name)

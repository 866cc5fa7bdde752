"""``router-temperature``: a per-layer router temperature, folded into the router weights [ours].

Per layer, the temperature t ∈ ``TEMPERATURES`` (router logits × t) whose pruned routing reproduces the
original routed output best, Σ‖y − ŷ_t‖², on the same inputs. A layer that keeps every expert gets t = 1
(its error is 0 there). Folded into the router weight and bias (not a selection bias); the reference is
the masked original with each router's logits multiplied by t.
"""

from __future__ import annotations

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
TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)


@COMPENSATIONS.register
class RouterTemperature(Compensation):
    name = "router-temperature"
    description = "a per-layer router temperature (from a grid) folded into the router weights"
    changes = ("each MoE layer's router weight (and router bias) was multiplied by that layer's temperature t, "
               "chosen so the pruned routing reproduces the original routed output best")

    def fit(self, model, kept, data, grid: tuple[float, ...] = TEMPERATURES):
        from fair_moe.units.experts.routing import masked_experts

        errors = {index: torch.zeros(len(grid), dtype=torch.float64) for index in kept}

        def tap(call):
            pruned = call.output()
            full = call.unmasked_output().double()
            for n, t in enumerate(grid):
                weights, ids = call.routing(scale=t)
                tried = call.run(call.hidden_states, ids, weights).double()
                errors[call.layer.index][n] += ((full - tried) ** 2).sum().item()
            return pruned

        with torch.no_grad(), masked_experts(model, kept, tap):
            forward_all(model, data.windows, data.batch_size)
        temperatures = {index: float(grid[int(torch.argmin(err))]) for index, err in errors.items()}
        return CompensationRecord(self.name, temperatures, {"fit_windows": len(data.windows)})

    def reference(self, model, record):
        from fair_moe.units.experts.routing import scaled_routers

        return scaled_routers(model, {int(k): float(v) for k, v in record.per_layer.items()})

    def fold(self, model, record):
        scale_in_place(model, record.per_layer, "router", _logit_tensor)

    def transform(self, model, record):
        return scaling_transform(model, record.per_layer, "router", _logit_tensor)

    def summary(self, record):
        return "router temperatures (folded into router weights): " + ", ".join(
            f"{k}: {float(v):.2f}" for k, v in sorted(record.per_layer.items()))


def _logit_tensor(adapter, config, name: str) -> bool:
    """Router weight and bias make the logits; a selection bias or a per-expert output scale does not."""
    return adapter.is_logit_tensor(config, name)

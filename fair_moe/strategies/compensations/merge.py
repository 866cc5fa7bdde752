"""``merge``: each removed expert averaged into its most similar kept expert [ours, after HC-SMoE].

One pass of the original model collects every expert's mean output over the tokens routed to it and
how many there were; a removed expert merges into the kept expert whose mean output is most similar
(cosine), and a kept expert's tensors become the routed-token-weighted average of its own and its
merged experts' tensors. Experts no token reached merge nowhere. Merging reads experts across shards,
so the checkpoint is sliced in memory.
"""

from __future__ import annotations

import contextlib

from fair_moe.core.lazy import lazy_module
from fair_moe.core.plan import CompensationRecord
from fair_moe.strategies.compensations.base import COMPENSATIONS, Compensation, forward_all

torch = lazy_module("torch")


@COMPENSATIONS.register
class Merge(Compensation):
    name = "merge"
    description = "average each removed expert into its most similar kept expert (weights = routed tokens)"
    changes = ("some kept experts' weights were replaced by the routed-token-weighted average of their own and of "
               "the removed experts merged into them (listed in fair_moe_plan.json)")
    streamable = False
    writes = "expert-weights"

    def unavailable(self, model):
        from fair_moe.adapters import get_adapter

        if any(layer.structure.experts_tail for layer in get_adapter(model.config).moe_layers(model)):
            return "its experts module also holds zero-computation experts, whose rows merging would not follow"
        return None

    def fit(self, model, kept, data):
        from fair_moe.adapters import get_adapter
        from fair_moe.units.experts.routing import expert_outputs, masked_experts, routed_pairs

        layers = {layer.index: layer for layer in get_adapter(model.config).moe_layers(model) if layer.index in kept}
        counts = {i: torch.zeros(layer.num_experts, dtype=torch.float64) for i, layer in layers.items()}
        sums: dict[int, torch.Tensor] = {}

        def tap(call):
            index, num_experts = call.layer.index, call.layer.num_experts
            token, ids, _ = routed_pairs(call.ids, num_experts)
            outputs = expert_outputs(call.run, call.hidden_states, token, ids, call.weights.dtype).double().cpu()
            if index not in sums:
                sums[index] = torch.zeros(num_experts, outputs.shape[-1], dtype=torch.float64)
            counts[index].index_add_(0, ids.cpu(), torch.ones(len(ids), dtype=torch.float64))
            sums[index].index_add_(0, ids.cpu(), outputs)
            return None

        with torch.no_grad(), masked_experts(model, None, tap):
            forward_all(model, data.windows, data.batch_size)
        merges = {index: _groups(kept[index], counts[index], sums.get(index)) for index in layers}
        return CompensationRecord(self.name, merges, {"fit_windows": len(data.windows)})

    @contextlib.contextmanager
    def reference(self, model, record):
        from fair_moe.adapters import get_adapter

        adapter = get_adapter(model.config)
        saved = [(getattr(layer.experts, name), getattr(layer.experts, name).detach().clone())
                 for layer in adapter.moe_layers(model) if layer.index in record.per_layer
                 for name in adapter.expert_tensor_names(layer.experts, layer.num_experts)]
        try:
            self.fold(model, record)
            yield
        finally:
            with torch.no_grad():
                for tensor, value in saved:
                    tensor.copy_(value)

    def fold(self, model, record):
        """Replace each receiving expert's tensors by the weighted average of its group (original ids)."""
        from fair_moe.adapters import get_adapter

        adapter = get_adapter(model.config)
        with torch.no_grad():
            for layer in adapter.moe_layers(model):
                groups = {int(t): m for t, m in (record.per_layer.get(layer.index) or {}).items()}
                for name in adapter.expert_tensor_names(layer.experts, layer.num_experts):
                    tensor = getattr(layer.experts, name)
                    for target, members in groups.items():
                        ids = torch.tensor([int(m[0]) for m in members])
                        weights = torch.tensor([float(m[1]) for m in members], dtype=torch.float64)
                        weights = weights / weights.sum()
                        mixed = (tensor[ids].double() * weights.view(-1, *[1] * (tensor.dim() - 1))).sum(0)
                        tensor[target] = mixed.to(tensor.dtype)

    def summary(self, record):
        merged = sum(len(m) - 1 for groups in record.per_layer.values() for m in groups.values())
        return f"merged {merged} removed experts into kept experts (see fair_moe_plan.json)"


def _groups(keep: list[int], counts, total) -> dict[int, list]:
    """{kept id: [[expert id, routed tokens], ...] (its own id first)} for kept experts that receive others."""
    groups = {k: [[k, float(counts[k])]] for k in keep}
    if total is not None:
        means = torch.nn.functional.normalize(total / counts.clamp_min(1)[:, None], dim=-1)
        live_kept = [k for k in keep if counts[k] > 0]
        for e in sorted(set(range(len(counts))) - set(keep)):
            if counts[e] > 0 and live_kept:
                target = max(live_kept, key=lambda k: (float(means[e] @ means[k]), -k))
                groups[target].append([e, float(counts[e])])
    return {k: members for k, members in groups.items() if len(members) > 1}

"""Verification that exact ties in half precision cannot fail: the routing trace of the probe.

In bfloat16 two kept experts' router logits are often exactly equal, and when they tie at the top-k boundary
``torch.topk`` may pick one of them over all ``E`` masked columns and the other over the ``E'`` kept columns of the
sliced router: the checkpoint is right, yet its outputs differ from the masked original's. When the plain comparison
fails in half precision, the writer checks the checkpoint in two parts that ties cannot touch:

1. the router: on the same inputs, every logits / selection-score tensor of each reloaded router equals the
   original's on its kept experts (``RoutingTrace.scores``), so the stock routing code, which is the same on both
   sides, can only choose differently where scores are (near-)tied;
2. everything else: the reloaded model run with the original's routing decisions at every layer (ids mapped to the
   kept experts' new positions, the same weights) gives the original's outputs.

Nothing about routing is re-implemented: both parts observe and replace what the models' own code computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from fair_moe.adapters import get_adapter
from fair_moe.units.experts.routing import ExpertsCall, expert_mask, masked_experts, patched_forward


@dataclass
class LayerTrace:
    """One MoE layer on the probe: the routing passed to its experts, ``ids`` / ``weights [T, k]`` (ids in the
    original model's numbering), and the router's logits / selection scores ``[T, E']`` on the kept experts, in the
    order the router computed them."""

    ids: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    weights: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    scores: list[torch.Tensor] = field(default_factory=list)
    num_experts: int = 0  # the layer's expert count in the model traced


@dataclass
class RoutingTrace:
    """A forward on the probe: the output logits ``[B, S, V]`` (float32, CPU) and each MoE layer's ``LayerTrace``."""

    logits: torch.Tensor
    layers: dict[int, LayerTrace]


def new_positions(kept: list[int] | None, num_experts: int) -> torch.Tensor:
    """``[E]`` → the position of each kept original expert in the sliced layer (kept in their original order), -1
    for a removed one; the identity when ``kept`` is None."""
    if kept is None:
        return torch.arange(num_experts)
    positions = torch.full((num_experts,), -1, dtype=torch.long)
    positions[sorted(kept)] = torch.arange(len(kept))
    return positions


def to_original(ids: torch.Tensor, kept: list[int] | None, num_experts: int) -> torch.Tensor:
    """Sliced-layer ids ``[T, k]`` → ids among the original ``num_experts`` (an id outside ``[0, E')``, a padding
    slot, keeps its distance past the end)."""
    if kept is None:
        return ids
    order = torch.tensor(sorted(kept), dtype=ids.dtype, device=ids.device)
    inside = (ids >= 0) & (ids < len(order))
    return torch.where(inside, order[ids.clamp(0, len(order) - 1)], ids + (num_experts - len(order)))


def to_sliced(ids: torch.Tensor, kept: list[int] | None, num_experts: int) -> torch.Tensor:
    """Original ids ``[T, k]`` → positions in the sliced layer (ids outside ``[0, E)`` keep their distance past it)."""
    if kept is None:
        return ids
    positions = new_positions(kept, num_experts).to(ids.device)
    inside = (ids >= 0) & (ids < num_experts)
    return torch.where(inside, positions[ids.clamp(0, num_experts - 1)], ids - num_experts + len(kept))


@contextlib.contextmanager
def _observed_routers(model: nn.Module, kept: dict[int, list[int]] | None, original: bool,
                      record: dict[int, LayerTrace]) -> Iterator[None]:
    """Every router's logits / selection scores go into ``record[layer].scores`` as ``[T, E']`` float32 on the CPU:
    restricted to the kept columns when ``original`` (the model still has all experts), whole otherwise. Entered
    before any masking or scaling of the routers, the observer is the innermost forward: its mode is the last entered,
    so it sees each score tensor as the other modes left it."""
    adapter = get_adapter(model.config)
    with contextlib.ExitStack() as stack:
        for layer in adapter.moe_layers(model):
            columns = sorted(kept[layer.index]) if original and kept is not None and layer.index in kept else None

            def observe(out, _index=layer.index, _columns=columns, _experts=layer.num_experts):
                scores = out.detach().reshape(-1, out.shape[-1])[:, :_experts]
                scores = scores[:, _columns] if _columns is not None else scores
                record.setdefault(_index, LayerTrace()).scores.append(scores.float().cpu())

            current = layer.router.forward

            def forward(self, *args, _layer=layer, _current=current, _observe=observe, **kwargs):
                with expert_mask(_layer, None, observe=_observe):
                    return _current(*args, **kwargs)

            stack.enter_context(patched_forward(layer.router, forward))
        yield


def _run(model: nn.Module, inputs: dict, forward_kwargs: dict) -> torch.Tensor:
    from fair_moe.metrics import execution_device

    device = execution_device(model)
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in inputs.items()}, **forward_kwargs)
    return out.logits.float().cpu()


def trace_original(model: nn.Module, inputs: dict, kept: dict[int, list[int]], forward_kwargs: dict,
                   reference: Callable[[], contextlib.AbstractContextManager]) -> RoutingTrace:
    """The probe through the reference (``reference()`` enters it: masked, compensated), with each layer's routing
    and its routers' final scores on the kept experts (observed inside the reference's own masking and scaling)."""
    record: dict[int, LayerTrace] = {}

    def tap(call: ExpertsCall) -> None:
        entry = record.setdefault(call.layer.index, LayerTrace())
        entry.ids, entry.weights = call.ids.detach().cpu(), call.weights.detach().float().cpu()
        entry.num_experts = call.layer.num_experts

    with _observed_routers(model, kept, True, record), reference(), masked_experts(model, None, tap):
        logits = _run(model, inputs, forward_kwargs)
    return RoutingTrace(logits, record)


def trace_following(model: nn.Module, inputs: dict, kept: dict[int, list[int]], reference: RoutingTrace,
                    forward_kwargs: dict) -> RoutingTrace:
    """The probe through the sliced ``model`` with every layer's experts given ``reference``'s routing (ids mapped
    to their sliced positions); the trace holds what its own routers chose (ids in the original numbering) and
    scored."""
    record: dict[int, LayerTrace] = {}

    def tap(call: ExpertsCall) -> torch.Tensor:
        index = call.layer.index
        layer_kept = kept.get(index)
        entry = record.setdefault(index, LayerTrace())
        given = reference.layers[index]
        entry.ids = to_original(call.ids.detach().cpu(), layer_kept, given.num_experts)
        entry.weights = call.weights.detach().float().cpu()
        entry.num_experts = call.layer.num_experts
        ids = to_sliced(given.ids, layer_kept, given.num_experts).to(call.ids.device, call.ids.dtype)
        return call.run(call.hidden_states, ids, given.weights.to(call.weights.device, call.weights.dtype))

    with _observed_routers(model, kept, False, record), masked_experts(model, None, tap):
        logits = _run(model, inputs, forward_kwargs)
    return RoutingTrace(logits, record)


def differing_decisions(reference: RoutingTrace, reloaded: RoutingTrace) -> tuple[int, int]:
    """(token decisions whose chosen set of experts differs, token decisions in all) over every MoE layer."""
    differing = total = 0
    for index, given in reference.layers.items():
        own = reloaded.layers[index]
        same = torch.sort(given.ids, dim=-1).values == torch.sort(own.ids, dim=-1).values
        differing += int((~same.all(dim=-1)).sum())
        total += given.ids.shape[0]
    return differing, total


def unexplained_decisions(reference: RoutingTrace, reloaded: RoutingTrace, kept: dict[int, list[int]],
                          slack: float) -> int:
    """Token decisions whose experts differ by more than score noise can explain: the original scored the experts
    only it chose above those only the reloaded router chose by more than ``slack`` (twice the largest score
    difference measured: each side's scores may be off by that much). Scores are the router's last scores, the
    ones it selects by (logits, or logits plus selection bias); a decision that cannot be placed on them (an id
    outside the layer) counts as unexplained."""
    unexplained = 0
    for index, given in reference.layers.items():
        own = reloaded.layers[index]
        scores = given.scores[-1] if given.scores else None  # [T, E'] on the kept experts
        positions = new_positions(kept.get(index), given.num_experts)
        for token in range(given.ids.shape[0]):
            ours, theirs = set(given.ids[token].tolist()), set(own.ids[token].tolist())
            if ours == theirs:
                continue
            only_ours, only_theirs = ours - theirs, theirs - ours
            inside = all(0 <= e < given.num_experts and positions[e] >= 0 for e in only_ours | only_theirs)
            if scores is None or not inside:
                unexplained += 1
                continue
            gap = (min(scores[token, positions[e]].item() for e in only_ours)
                   - max(scores[token, positions[e]].item() for e in only_theirs))
            unexplained += int(gap > slack)
    return unexplained


def score_difference(reference: RoutingTrace, reloaded: RoutingTrace) -> tuple[float, float] | None:
    """(max |Δ| over every router score tensor, max |score| of the original's), or None when the two routers did not
    compute the same tensors (then they cannot be compared)."""
    worst, largest = 0.0, 0.0
    for index, given in reference.layers.items():
        own = reloaded.layers.get(index)
        if own is None or len(own.scores) != len(given.scores):
            return None
        for a, b in zip(given.scores, own.scores, strict=True):
            if a.shape != b.shape:
                return None
            finite = torch.isfinite(a) & torch.isfinite(b)
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                return None
            if finite.any():
                worst = max(worst, (a[finite] - b[finite]).abs().max().item())
                largest = max(largest, a[finite].abs().max().item())
    return worst, largest

"""Allocation: how many units each layer loses, and which ones. Pure functions on score tensors.

Notation (docs/METHOD.md §2–§3): a layer has n units with removal scores ``u [n]`` (low = remove first)
and protection scores ``r [n]`` (high = protect). ``rem`` is ``u`` ascending, ``prot`` is ``r``
descending; both orders are stable, so ties go to the lower unit id. ``ToD(k) = |rem[:k] ∩ prot[:k]| / k``
for k = 1 … n_max, and a layer's units removed are always ``rem[:k]``.

Group-limited routers (``groups`` G > 1, contiguous groups of n/G experts) [ours]: every group must
stay selectable, so each group loses the same number of experts. Units then go in *steps* of G: step
j removes the j-th lowest-U expert of every group, k = G·j, and ToD(k) compares the experts removed
by the first j steps with ``prot[:k]``. With G = 1 a step is one unit and everything reduces to the
plain rule above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fair_moe.core.errors import FairMoeError


@dataclass
class Allocation:
    """Units removed per layer (row order = layer order) and, for ToD, the tolerance α* used."""

    removed: list[list[int]]
    alpha: float | None = None

    @property
    def counts(self) -> list[int]:
        return [len(r) for r in self.removed]


def removal_order(u: torch.Tensor) -> torch.Tensor:
    """Unit ids [n] by removal score ascending (ties: lower id first)."""
    return torch.sort(u.double(), stable=True).indices


def protection_order(r: torch.Tensor) -> torch.Tensor:
    """Unit ids [n] by protection score descending (ties: lower id first)."""
    return torch.sort(-r.double(), stable=True).indices


def removal_steps(u: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Unit ids removed at each step [n / groups, groups]: row j holds the j-th lowest-U unit of every group."""
    n = len(u)
    if n % groups:
        raise ValueError(f"{n} units do not split into {groups} equal groups")
    size = n // groups
    within = torch.stack([removal_order(u[g * size : (g + 1) * size]) + g * size for g in range(groups)], dim=1)
    return within


def tod_curve(u: torch.Tensor, r: torch.Tensor, n_max: int, groups: int = 1) -> torch.Tensor:
    """ToD after each step, float64 [n_max // groups] (entry j-1 is ToD(k = groups·j))."""
    steps = n_max // groups
    if steps <= 0:
        return torch.zeros(0, dtype=torch.float64)
    order = removal_steps(u, groups)[:steps].flatten()  # removal order, step by step
    rank_in_prot = torch.empty(len(r), dtype=torch.long)
    rank_in_prot[protection_order(r)] = torch.arange(len(r))
    a = rank_in_prot[order]  # a[i]: where the i-th removal candidate stands in the protection order
    ks = torch.arange(1, steps + 1) * groups
    in_prefix = torch.arange(len(order))[:, None] < ks[None, :]
    protected_in_prefix = a[:, None] < ks[None, :]
    overlap = (in_prefix & protected_in_prefix).sum(0).double()
    return overlap / ks.double()


def tod_count(curve: torch.Tensor, alpha: float, strict: bool = False) -> int:
    """Largest k with ToD(k) ≤ α (``strict``: < α); 0 if none. ToD is not monotone, so all k are scanned."""
    ok = curve < alpha if strict else curve <= alpha
    hits = torch.nonzero(ok).flatten()
    return int(hits[-1]) + 1 if len(hits) else 0


def tod_counts(curves: list[torch.Tensor], alpha: float) -> list[int]:
    """k_l(α) for every layer."""
    return [tod_count(c, alpha) for c in curves]


def match_budget(curves: list[torch.Tensor], next_r: list[torch.Tensor], total: int) -> tuple[list[int], float]:
    """Per-layer counts summing to exactly ``total`` and the tolerance α* (docs/METHOD.md §3).

    α* is the smallest value ToD takes anywhere with Σ_l k_l(α*) ≥ total. Every layer first gets
    k_l(α* − ε); the rest is handed out one unit at a time among the layers whose count jumps at α*,
    each time to the layer whose next removal candidate has the lowest protection score.

    Args:
        curves: ToD curves, one float64 [n_max_l] per layer.
        next_r: per layer, protection scores in removal order [n_max_l] (entry j: R of rem[j]).
        total: units to remove over all layers.
    """
    capacity = sum(len(c) for c in curves)
    if total > capacity:
        raise FairMoeError(
            f"cannot remove {total} units: at most {capacity} can go while every layer keeps its minimum"
        )
    if total <= 0:
        return [0] * len(curves), 0.0
    values = torch.unique(torch.cat([c for c in curves if len(c)] + [torch.zeros(1, dtype=torch.float64)]))
    lo, hi = 0, len(values) - 1  # values[hi] is the largest ToD value, where every layer reaches n_max
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(tod_counts(curves, float(values[mid]))) >= total:
            hi = mid
        else:
            lo = mid + 1
    alpha = float(values[lo])
    counts = [tod_count(c, alpha, strict=True) for c in curves]
    ceilings = tod_counts(curves, alpha)
    for _ in range(total - sum(counts)):
        open_layers = [i for i in range(len(curves)) if counts[i] < ceilings[i]]
        best = min(open_layers, key=lambda i: (float(next_r[i][counts[i]]), i))
        counts[best] += 1
    return counts, alpha


def _removed(u_row: torch.Tensor, steps: int, groups: int) -> list[int]:
    return removal_steps(u_row, groups)[:steps].flatten().tolist()


def tod(
    u: torch.Tensor, r: torch.Tensor, n_max: list[int], total: int | None = None, alpha: float | None = None,
    groups: int = 1
) -> Allocation:
    """ToD allocation over layers; exactly one of ``total`` (budget match) or ``alpha`` (tolerance).

    Args:
        u, r: removal and protection scores [L, n].
        n_max: per layer, the most units that may go (n − min_keep), a multiple of ``groups``.
        total: units to remove in all, a multiple of ``groups``.
    """
    if (total is None) == (alpha is None):
        raise ValueError("pass exactly one of total or alpha")
    curves = [tod_curve(u[i], r[i], n_max[i], groups) for i in range(len(u))]
    if alpha is not None:
        counts = tod_counts(curves, alpha)
    else:
        # A step's protection is the mean R of the units it removes (R itself when groups == 1).
        next_r = [r[i].double()[removal_steps(u[i], groups)[: len(curves[i])]].mean(dim=1) for i in range(len(u))]
        counts, alpha = match_budget(curves, next_r, _steps(total, groups))
    return Allocation(removed=[_removed(u[i], counts[i], groups) for i in range(len(u))], alpha=alpha)


def _steps(units: int, groups: int) -> int:
    if units % groups:
        raise ValueError(f"{units} units are not a whole number of {groups}-unit steps")
    return units // groups


def uniform(u: torch.Tensor, per_layer: int, groups: int = 1) -> Allocation:
    """The ``per_layer`` lowest-U units of every layer [L, n] (per group: ``per_layer / groups`` each)."""
    return Allocation(removed=[_removed(row, _steps(per_layer, groups), groups) for row in u])


def global_(u: torch.Tensor, n_max: list[int], total: int, groups: int = 1) -> Allocation:
    """The ``total`` lowest units over all layers after dividing U by its layer's mean U.

    Layers give units in removal order, each step's cost being the mean normalised U of its units;
    the cheapest next step over all layers goes first, and a layer stops at ``n_max``. Ties: lower
    layer first (with ``groups == 1`` this is exactly "sort every unit, take the lowest").
    """
    means = u.double().mean(dim=1, keepdim=True)
    normalised = u.double() / torch.where(means > 0, means, torch.ones_like(means))
    costs = [normalised[i][removal_steps(u[i], groups)].mean(dim=1) for i in range(len(u))]
    taken = [0] * len(u)
    for _ in range(_steps(total, groups)):
        open_layers = [i for i in range(len(u)) if (taken[i] + 1) * groups <= n_max[i]]
        if not open_layers:
            raise FairMoeError(f"cannot remove {total} units: layers can only give {sum(taken) * groups}")
        best = min(open_layers, key=lambda i: (float(costs[i][taken[i]]), i))
        taken[best] += 1
    return Allocation(removed=[_removed(u[i], taken[i], groups) for i in range(len(u))])

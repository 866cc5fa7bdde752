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


def admissible(curve: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step counts a layer may take at tolerance α: bool [len(curve) + 1], entry k for k steps (k = 0 always)."""
    return torch.cat([torch.ones(1, dtype=torch.bool), curve <= alpha])


def reachable(curves: list[torch.Tensor], alpha: float, total: int) -> bool:
    """Whether per-layer counts k_l, each admissible at α, can sum to exactly ``total`` (a subset-sum)."""
    reach = torch.zeros(total + 1, dtype=torch.bool)
    reach[0] = True
    for curve in curves:
        nxt = torch.zeros_like(reach)
        for k in torch.nonzero(admissible(curve, alpha)).flatten().tolist():
            if k <= total:
                nxt[k:] |= reach[: total + 1 - k]
        reach = nxt
    return bool(reach[total])


def match_budget(curves: list[torch.Tensor], step_protection: list[torch.Tensor], total: int
                 ) -> tuple[list[int], float]:
    """Per-layer counts summing to exactly ``total`` in which every layer honours one tolerance α* (docs/METHOD.md §3).

    α* is the smallest value ToD takes (or 0) at which every layer can take a k_l with ToD_l(k_l) ≤ α* (k_l = 0
    always allowed) and Σ_l k_l = total — found by bisection, since the admissible sets only grow with α. Among
    the choices at α*, the fewest layers leave the paper's own count (their largest admissible k), then the
    least protection is removed, then earlier layers keep the paper's count.

    Args:
        curves: ToD curves, one float64 [n_max_l] per layer (entry j: ToD after j + 1 steps).
        step_protection: per layer, R removed by each step in removal order, float64 [n_max_l].
        total: steps to remove over all layers.
    """
    capacity = sum(len(c) for c in curves)
    if total > capacity:
        raise FairMoeError(f"cannot remove {total} units: at most {capacity} can go while every layer keeps its "
                           "minimum")
    if total <= 0:
        return [0] * len(curves), 0.0
    values = torch.unique(torch.cat([c for c in curves if len(c)] + [torch.zeros(1, dtype=torch.float64)]))
    lo, hi = 0, len(values) - 1  # at values[hi], the largest ToD value, every k up to n_max is admissible
    while lo < hi:
        mid = (lo + hi) // 2
        if reachable(curves, float(values[mid]), total):
            hi = mid
        else:
            lo = mid + 1
    alpha = float(values[lo])
    return _cheapest_exact_choice(curves, step_protection, alpha, total), alpha


def _cheapest_exact_choice(curves, step_protection, alpha: float, total: int) -> list[int]:
    """The tie rule of ``match_budget`` as a dynamic programme over layers and running totals.

    Costs are compared as (layers off the paper's count, protection removed), lexicographically; a layer's
    options are visited from the largest k down, so equal costs keep the larger k of the later layers.
    """
    inf = float("inf")
    off = torch.full((total + 1,), inf, dtype=torch.float64)
    prot = torch.full((total + 1,), inf, dtype=torch.float64)
    off[0] = prot[0] = 0.0
    choices = []
    for curve, removed_r in zip(curves, step_protection, strict=True):
        options = torch.nonzero(admissible(curve, alpha)).flatten().tolist()
        paper_k = options[-1]
        cost = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(removed_r.double(), 0)])
        new_off = torch.full_like(off, inf)
        new_prot = torch.full_like(prot, inf)
        choice = torch.full((total + 1,), -1, dtype=torch.long)
        for k in reversed(options):
            if k > total:
                continue
            cand_off = torch.full_like(off, inf)
            cand_prot = torch.full_like(prot, inf)
            cand_off[k:] = off[: total + 1 - k] + float(k != paper_k)
            cand_prot[k:] = prot[: total + 1 - k] + float(cost[k])
            better = (cand_off < new_off) | ((cand_off == new_off) & (cand_prot < new_prot))
            new_off = torch.where(better, cand_off, new_off)
            new_prot = torch.where(better, cand_prot, new_prot)
            choice = torch.where(better, torch.full_like(choice, k), choice)
        off, prot = new_off, new_prot
        choices.append(choice)
    counts, t = [], total
    for choice in reversed(choices):
        k = int(choice[t])
        counts.append(k)
        t -= k
    return counts[::-1]


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
        # A step's protection is the R of the units it removes (R itself when groups == 1).
        step_r = [r[i].double()[removal_steps(u[i], groups)[: len(curves[i])]].sum(dim=1) for i in range(len(u))]
        counts, alpha = match_budget(curves, step_r, _steps(total, groups))
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

"""Allocation rules: how many units each layer loses, and which (the pure functions in ``fair_moe.allocation``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fair_moe.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

    from fair_moe.allocation import Allocation


class AllocationRule:
    """One allocation rule, registered under its ``--allocation`` name."""

    name: str
    description: str
    supports_tolerance: bool = False  # whether --tolerance (ToD's α) applies
    auto_candidate: bool = True  # whether --allocation auto tries it
    paper: bool = False  # the FAIR-Pruner paper's own rule
    even_counts: bool = False  # every layer always loses the same number (the plan loads with the stock class)

    def allocate(self, u: Tensor, r: Tensor, n_max: list[int], total: int | None, alpha: float | None,
                 groups: int) -> Allocation:
        """Removed units per layer from U and R [L, n]: exactly ``total`` over all layers, or by tolerance α.

        ``n_max`` is the most each layer may lose (a multiple of ``groups``).
        """
        raise NotImplementedError


ALLOCATIONS: Registry[AllocationRule] = Registry("allocation", "--allocation")

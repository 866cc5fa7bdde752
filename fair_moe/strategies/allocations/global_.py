"""``global``: the lowest units over all layers after dividing U by its layer's mean."""

from __future__ import annotations

from fair_moe.strategies.allocations.base import ALLOCATIONS, AllocationRule


@ALLOCATIONS.register
class Global(AllocationRule):
    name = "global"
    description = "the lowest units over all layers after dividing U by its layer's mean U"

    def allocate(self, u, r, n_max, total, alpha, groups):
        from fair_moe import allocation

        return allocation.global_(u, n_max, total, groups)

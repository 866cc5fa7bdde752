"""``uniform``: every layer loses the same number, its lowest-U units."""

from __future__ import annotations

from fair_moe.strategies.allocations.base import ALLOCATIONS, AllocationRule


@ALLOCATIONS.register
class Uniform(AllocationRule):
    name = "uniform"
    description = "every layer loses the same number of units, its lowest-U ones"
    even_counts = True

    def allocate(self, u, r, n_max, total, alpha, groups):
        from fair_moe import allocation

        return allocation.uniform(u, total // len(u), groups)

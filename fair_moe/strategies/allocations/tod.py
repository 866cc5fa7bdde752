"""``tod``: Tolerance of Difference, the FAIR-Pruner paper's rule (docs/METHOD.md §2–§3)."""

from __future__ import annotations

from fair_moe.strategies.allocations.base import ALLOCATIONS, AllocationRule


@ALLOCATIONS.register
class ToleranceOfDifference(AllocationRule):
    name = "tod"
    description = "Tolerance of Difference (the paper's rule): one shared tolerance α sets every layer's count"
    supports_tolerance = True
    paper = True

    def allocate(self, u, r, n_max, total, alpha, groups):
        from fair_moe import allocation

        if total is not None:
            return allocation.tod(u, r, n_max, total=total, groups=groups)
        return allocation.tod(u, r, n_max, alpha=alpha, groups=groups)

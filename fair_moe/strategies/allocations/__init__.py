"""Allocation rules; every module here registers one rule. Import order = ``--allocation`` choices and the
order in which ``--allocation auto`` tries them (the first of equal losses wins)."""

from importlib import import_module

from fair_moe.strategies.allocations.base import ALLOCATIONS, AllocationRule

for _module in ("tod", "uniform", "global_"):
    import_module(f"{__name__}.{_module}")

__all__ = ["ALLOCATIONS", "AllocationRule"]

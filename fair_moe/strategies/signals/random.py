"""``random``: seeded uniform scores, the control every pruning paper reports."""

from __future__ import annotations

from fair_moe.core.lazy import lazy_module
from fair_moe.strategies.signals.base import REMOVAL_SIGNALS, RemovalSignal

torch = lazy_module("torch")


@REMOVAL_SIGNALS.register
class Random(RemovalSignal):
    name = "random"
    description = "seeded random scores (a control)"
    auto_candidate = False

    def compute(self, stats):
        return torch.rand(stats.shape, generator=torch.Generator().manual_seed(stats.seed), dtype=torch.float64)

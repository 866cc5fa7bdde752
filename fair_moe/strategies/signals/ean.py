"""``ean``: Σ over routed tokens of the expert's output norm ‖f(x)‖."""

from __future__ import annotations

from fair_moe.strategies.signals.base import REMOVAL_SIGNALS, RemovalSignal


@REMOVAL_SIGNALS.register
class Ean(RemovalSignal):
    name = "ean"
    description = "sum over routed tokens of ‖expert output‖"
    requires = ("output_norm",)

    def compute(self, stats):
        return stats.output_norm.clone()

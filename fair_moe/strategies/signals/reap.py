"""``reap``: mean over the tokens routed to an expert of g·‖f(x)‖ (REAP, Cerebras 2025)."""

from __future__ import annotations

from fair_moe.strategies.signals.base import REMOVAL_SIGNALS, RemovalSignal


@REMOVAL_SIGNALS.register
class Reap(RemovalSignal):
    name = "reap"
    description = "mean over routed tokens of router weight × ‖expert output‖ (REAP)"
    requires = ("count", "gated_norm")

    def compute(self, stats):
        return stats.gated_norm / stats.count.clamp_min(1)

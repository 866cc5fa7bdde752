"""``frequency``: how many calibration tokens selected the expert."""

from __future__ import annotations

from fair_moe.strategies.signals.base import REMOVAL_SIGNALS, RemovalSignal


@REMOVAL_SIGNALS.register
class Frequency(RemovalSignal):
    name = "frequency"
    description = "top-k selections over the calibration tokens"
    requires = ("count",)

    def compute(self, stats):
        return stats.count.clone()

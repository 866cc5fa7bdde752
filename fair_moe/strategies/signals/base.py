"""Removal signals (U, low = remove first) and protection signals (R, high = keep), computed from the sums
one calibration pass left (``SignalStatistics``).

A signal states the statistics it needs (``requires``); a unit kind states what its calibration
measures, so which signals a kind offers follows from the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fair_moe.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

    from fair_moe.core.statistics import SignalStatistics


class RemovalSignal:
    """One removal signal, registered under its ``--removal`` name."""

    name: str
    description: str
    requires: tuple[str, ...] = ()  # SignalStatistics fields the signal is computed from
    auto_candidate: bool = True  # whether --allocation auto tries it
    paper: bool = False  # the FAIR-Pruner paper's own U-score

    def available(self, measures: tuple[str, ...]) -> bool:
        """Whether a unit kind whose calibration measures ``measures`` can have this signal."""
        return set(self.requires) <= set(measures)

    def computable(self, stats: SignalStatistics) -> bool:
        return all(stats.has(field) for field in self.requires)

    def needs(self) -> str:
        """What the calibration must measure for this signal, in words (for errors)."""
        return ", ".join(self.requires)

    def compute(self, stats: SignalStatistics) -> Tensor:
        """U [L, n], float64."""
        raise NotImplementedError

    def compute_given(self, stats: SignalStatistics, computed: dict[str, Tensor]) -> Tensor:
        """U [L, n] when the signals registered before this one are already ``computed`` ({name: U [L, n]}): a
        signal built from others reads them there instead of computing them again."""
        return self.compute(stats)


class ProtectionSignal:
    """One protection signal, registered under its ``--protection`` name."""

    name: str
    description: str

    def compute(self, stats: SignalStatistics) -> Tensor:
        """R [L, n], float64."""
        raise NotImplementedError


REMOVAL_SIGNALS: Registry[RemovalSignal] = Registry("removal signal", "--removal")
PROTECTION_SIGNALS: Registry[ProtectionSignal] = Registry("protection signal", "--protection")


def compute_signals(stats: SignalStatistics) -> tuple[dict[str, Tensor], Tensor]:
    """Every removal signal the statistics allow, {name: U [L, n]}, and the Taylor protection R [L, n]."""
    removal: dict[str, Tensor] = {}
    for signal in REMOVAL_SIGNALS:
        if signal.computable(stats):
            removal[signal.name] = signal.compute_given(stats, removal)
    return removal, PROTECTION_SIGNALS.get("taylor").compute(stats)

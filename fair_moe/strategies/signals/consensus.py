"""``consensus``: the mean over the other data-driven removal signals of an expert's rank within its layer [ours].

Each constituent (reap, frequency, ean, and wasserstein where there are two or more calibration classes) ranks the
units of a layer from 0 (lowest, removed first) to 1 (highest), ties sharing their mean rank; U is the mean of those
normalised ranks. A unit scores low only when every signal finds it unimportant, so a plan built on it hedges
across signals instead of betting on one: where the signals disagree about a unit, it is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fair_moe.core.lazy import lazy_module
from fair_moe.strategies.signals.base import REMOVAL_SIGNALS, RemovalSignal

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")
CONSTITUENTS = ("reap", "frequency", "ean", "wasserstein")
MIN_CONSTITUENTS = 2


def normalised_ranks(values: Tensor) -> Tensor:
    """values [L, n] → ranks [L, n] in [0, 1] along each row: 0 for the lowest, 1 for the highest, tied values
    sharing the mean of their ranks (every rank 0.5 when n = 1)."""
    below = (values.unsqueeze(2) > values.unsqueeze(1)).sum(2).double()  # [L, n]: entries below each value
    ties = (values.unsqueeze(2) == values.unsqueeze(1)).sum(2).double()  # [L, n]: equal entries, itself included
    width = values.shape[1]
    return (below + (ties - 1) / 2) / (width - 1) if width > 1 else torch.full_like(below, 0.5)


@REMOVAL_SIGNALS.register
class Consensus(RemovalSignal):
    name = "consensus"
    description = "mean rank within the layer over reap, frequency, ean and wasserstein (where computable)"
    # Not an auto candidate: on the development cells it helped demo, tied on mixtral and lost on deepseek as a
    # fixed plan (uniform + consensus vs uniform + ean), and as an extra auto candidate it moved one cell above
    # its best baseline; opt in with --removal consensus.
    auto_candidate = False

    def constituents(self) -> list[RemovalSignal]:
        return [REMOVAL_SIGNALS.get(name) for name in CONSTITUENTS]

    def available(self, measures: tuple[str, ...]) -> bool:
        return sum(signal.available(measures) for signal in self.constituents()) >= MIN_CONSTITUENTS

    def computable(self, stats) -> bool:
        return sum(signal.computable(stats) for signal in self.constituents()) >= MIN_CONSTITUENTS

    def needs(self) -> str:
        return f"at least {MIN_CONSTITUENTS} of the signals {', '.join(CONSTITUENTS)}"

    def compute(self, stats):
        return self.compute_given(stats, {})

    def compute_given(self, stats, computed):
        ranks = [normalised_ranks(computed[signal.name] if signal.name in computed else signal.compute(stats))
                 for signal in self.constituents() if signal.computable(stats)]
        return torch.stack(ranks).mean(0)

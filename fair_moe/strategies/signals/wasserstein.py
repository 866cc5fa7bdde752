"""``wasserstein``: the paper's U-score — how well a unit's output separates the calibration classes.

Per unit, U = max over class pairs of the 1-D Wasserstein-1 distance between the two classes' empirical
distributions of the unit's per-sample value (docs/METHOD.md §1). Needs at least two classes.
"""

from __future__ import annotations

from fair_moe.core.lazy import lazy_module
from fair_moe.strategies.signals.base import REMOVAL_SIGNALS, RemovalSignal
from fair_moe.strategies.signals.wasserstein_distance import max_pairwise_wasserstein

torch = lazy_module("torch")


@REMOVAL_SIGNALS.register
class Wasserstein(RemovalSignal):
    name = "wasserstein"
    description = "max over pairs of calibration classes of the W1 distance between a unit's value distributions " \
                  "(the paper's U-score; needs ≥ 2 classes)"
    requires = ("class_samples",)
    paper = True

    def computable(self, stats) -> bool:
        """Two or more classes, each with data (a class whose windows all went elsewhere has no distribution)."""
        tokens = getattr(stats.class_samples, "class_tokens", None)
        return super().computable(stats) and (tokens is None or all(tokens))

    def compute(self, stats):
        return torch.stack([max_pairwise_wasserstein(stats.class_samples(row)) for row in range(stats.shape[0])])

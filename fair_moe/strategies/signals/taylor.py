"""``taylor``: the protection R = |Σ over calibration batches of Σ_params (∂L/∂W ⊙ W)| (docs/METHOD.md §1).

The sign is kept while summing over batches and the absolute value taken once at the end.
"""

from __future__ import annotations

from fair_moe.strategies.signals.base import PROTECTION_SIGNALS, ProtectionSignal


@PROTECTION_SIGNALS.register
class Taylor(ProtectionSignal):
    name = "taylor"
    description = "first-order Taylor estimate of the loss change when the unit is removed"

    def compute(self, stats):
        return stats.taylor.abs()

"""``none``: nothing but the removal; the checkpoint equals the masked original exactly."""

from __future__ import annotations

from fair_moe.strategies.compensations.base import COMPENSATIONS, Compensation


@COMPENSATIONS.register
class NoCompensation(Compensation):
    name = "none"
    description = "change nothing but the removal (the paper's rule)"
    changes = "nothing"

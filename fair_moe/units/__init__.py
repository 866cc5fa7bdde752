"""Unit kinds: routed experts of MoE language models, MLP neurons and attention heads of vision transformers.

Each kind registers itself in ``UNIT_KINDS`` under its ``--units`` name when its package is imported.
"""

from fair_moe.units import experts, vision  # noqa: F401  (registration)
from fair_moe.units.base import UNIT_KINDS, UnitKind

__all__ = ["UNIT_KINDS", "UnitKind"]

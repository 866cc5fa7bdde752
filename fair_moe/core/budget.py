"""How much a plan removes, parsed and validated once, and what it is checked against.

A ``Budget`` is either a fraction b of all units (the plan then removes exactly ``L × round(b·n)``
units over L layers of n units, so that uniform pruning at the same budget is ``round(b·n)`` per
layer) or ToD's tolerance α. Rounding is exact decimal arithmetic on the number as written, halves
up: 0.5 × 7 removes 4, and 0.3 × 5 = 1.5 removes 2 (in floating point 0.3 × 5 is 1.4999…). With
group-limited routing (G groups that must each lose the same number) the count is G × round(b·n / G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from fair_moe.core.errors import FairMoeError


@dataclass(frozen=True)
class Budget:
    """One plan's size: exactly one of ``fraction`` (0 < b < 1) and ``tolerance`` (α in [0, 1])."""

    fraction: float | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tolerance is None):
            raise FairMoeError("pass exactly one of --budget and --tolerance")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0 < self.fraction < 1):
            raise FairMoeError(f"--budget {self.fraction} must be a fraction strictly between 0 and 1 (e.g. 0.25)")
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and 0 <= self.tolerance <= 1):
            raise FairMoeError(f"--tolerance {self.tolerance} must be in [0, 1]")

    @classmethod
    def parse(cls, budget: str | float | None, tolerance: float | None = None) -> tuple[Budget, ...]:
        """``--budget`` text (one fraction or distinct comma-separated fractions) or ``--tolerance`` → budgets."""
        if budget is None and tolerance is None:
            raise FairMoeError("pass --budget FRACTION (e.g. 0.25) or --tolerance ALPHA")
        if budget is None:
            return (cls(tolerance=float(tolerance)),)
        if tolerance is not None:
            raise FairMoeError("pass exactly one of --budget and --tolerance")
        if isinstance(budget, (int, float)):
            return (cls(fraction=float(budget)),)
        try:
            fractions = [float(part) for part in str(budget).split(",") if part.strip()]
        except ValueError as err:
            raise FairMoeError(f"--budget {budget!r} is not a number or a comma-separated list of numbers "
                               "(e.g. 0.25,0.5)") from err
        if not fractions or len(set(fractions)) != len(fractions):
            raise FairMoeError(f"--budget {budget!r}: give one fraction or distinct comma-separated fractions")
        return tuple(cls(fraction=f) for f in fractions)

    @property
    def label(self) -> str:
        """Folder name of this budget's checkpoint in a multi-budget run."""
        return f"budget-{self.fraction}" if self.fraction is not None else f"tolerance-{self.tolerance}"

    def removed_per_layer(self, width: int, groups: int = 1) -> int:
        """round(b·n) with halves up, exact on the decimal as written; G × round(b·n / G) with G groups."""
        if self.fraction is None:
            raise ValueError("a tolerance has no per-layer count")
        steps = Fraction(repr(self.fraction)) * width / groups
        return groups * math.floor(steps + Fraction(1, 2))


@dataclass(frozen=True)
class UnitLayout:
    """What a budget is checked against: ``width`` units in each of the ``layers`` (layer indices).

    ``floor`` is the least a layer may keep (the router's top_k for experts, 1 for vision units) and
    ``floor_reason`` says why, for messages. Group-limited routers have ``groups`` G > 1 equal groups, each
    keeping at least ``min_per_group`` units. ``top_k`` is the router's top_k (experts only). ``whole`` are layers
    that hold ``width`` units too but are kept whole (not units: ``PrunePlan.whole``); budgets count only ``layers``.
    """

    unit: str
    width: int
    layers: tuple[int, ...]
    floor: int
    floor_reason: str
    groups: int = 1
    min_per_group: int = 0
    top_k: int | None = None
    whole: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def min_keep(self, requested: int | None) -> int:
        """The units every layer keeps: ``--min-keep`` if given (never below the floor), else the floor."""
        if requested is None:
            return self.floor
        if requested < self.floor:
            raise FairMoeError(f"--min-keep {requested} is below {self.floor} ({self.floor_reason}): every layer must "
                               f"keep at least {self.floor} {self.unit}")
        if requested > self.width:
            raise FairMoeError(f"--min-keep {requested} is more than the {self.width} {self.unit} a layer has")
        return requested

    def max_removable(self, min_keep: int) -> int:
        """Most units one layer may lose: kept ≥ min_keep, every group keeps ≥ min_per_group, whole steps of G."""
        by_total = (self.width - min_keep) // self.groups
        by_group = self.width // self.groups - self.min_per_group
        return max(0, min(by_total, by_group)) * self.groups

    def total(self, budget: Budget, min_keep: int) -> int | None:
        """Units removed over all layers (exact), checked before any work; None for a tolerance."""
        if budget.fraction is None:
            return None
        n, per_layer = self.width, budget.removed_per_layer(self.width, self.groups)
        grouped = (f" (group-limited routing: {self.groups} groups lose the same number each)"
                   if self.groups > 1 else "")
        if per_layer == 0:
            raise FairMoeError(f"--budget {budget.fraction} removes 0 of {n} {self.unit} per layer{grouped}: "
                               "raise --budget")
        most = self.max_removable(min_keep)
        if per_layer > most:
            keep = max(min_keep, self.groups * self.min_per_group)
            why = self.floor_reason if min_keep == self.floor else f"--min-keep {min_keep}"
            if self.groups * self.min_per_group > min_keep:
                why += f"; each of {self.groups} groups keeps at least {self.min_per_group}"
            raise FairMoeError(
                f"--budget {budget.fraction} is too aggressive: it removes {per_layer} of {n} {self.unit} per "
                f"layer{grouped}, leaving {n - per_layer}, but a layer must keep at least {keep} ({why}); "
                f"use --budget ≤ {most / n:.4f}"
            )
        return per_layer * self.num_layers

    def to_meta(self) -> dict:
        return {"unit": self.unit, "width": self.width, "layers": list(self.layers), "floor": self.floor,
                "floor_reason": self.floor_reason, "groups": self.groups, "min_per_group": self.min_per_group,
                "top_k": self.top_k, "whole": list(self.whole)}

    @classmethod
    def from_meta(cls, meta: dict) -> UnitLayout:
        return cls(meta["unit"], int(meta["width"]), tuple(meta["layers"]), int(meta["floor"]), meta["floor_reason"],
                   int(meta.get("groups", 1)), int(meta.get("min_per_group", 0)), meta.get("top_k"),
                   tuple(meta.get("whole", ())))

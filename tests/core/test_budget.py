"""Budgets are parsed and validated once; per-layer counts are exact decimal rounding, halves up."""

import math

import pytest

from fair_moe.core.budget import Budget, UnitLayout
from fair_moe.core.errors import FairMoeError


@pytest.mark.parametrize("fraction,width,groups,expected", [
    (0.5, 7, 1, 4),      # 3.5 → 4
    (0.5, 5, 1, 3),      # 2.5 → 3 (round(2.5) == 2 in Python)
    (0.3, 5, 1, 2),      # 1.5 exactly as written; 0.3 * 5 == 1.4999999999999998 in floating point
    (0.25, 32, 1, 8),
    (0.375, 60, 1, 23),  # 22.5 → 23
    (0.25, 12, 3, 3),    # 3 groups: 3 × round(1.0)
    (0.5, 12, 3, 6),     # 3 × round(2.0)
    (0.125, 12, 3, 3),   # 3 × round(0.5): a half step rounds up to one step of 3
])
def test_removed_per_layer(fraction, width, groups, expected):
    assert Budget(fraction).removed_per_layer(width, groups) == expected


@pytest.mark.parametrize("text,message", [
    ("nan", "between 0 and 1"), ("1", "between 0 and 1"), ("0", "between 0 and 1"), ("-0.2", "between 0 and 1"),
    ("0.25,abc", "not a number"), ("0.25,0.25", "distinct"), (",", "one fraction"), ("inf", "between 0 and 1"),
])
def test_bad_budget_text_is_refused(text, message):
    with pytest.raises(FairMoeError, match=message):
        Budget.parse(text)


def test_parse_lists_and_tolerance():
    assert Budget.parse("0.25, 0.5") == (Budget(0.25), Budget(0.5))
    assert Budget.parse(None, 0.3) == (Budget(tolerance=0.3),)
    assert [b.label for b in Budget.parse("0.25,0.5")] == ["budget-0.25", "budget-0.5"]
    with pytest.raises(FairMoeError, match="--budget FRACTION"):
        Budget.parse(None, None)
    with pytest.raises(FairMoeError, match="exactly one"):
        Budget.parse("0.25", 0.3)
    with pytest.raises(FairMoeError, match=r"\[0, 1\]"):
        Budget(tolerance=math.nan)


LAYOUT = UnitLayout("experts", 12, (0, 2, 3), 3, "the router selects top_k=3", top_k=3)


def test_total_is_exact_and_checked_against_the_floor():
    assert LAYOUT.total(Budget(0.5), 3) == 3 * 6
    assert LAYOUT.total(Budget(tolerance=0.2), 3) is None
    assert LAYOUT.max_removable(3) == 9
    assert LAYOUT.total(Budget(0.75), 3) == 27  # 9 of 12: exactly top_k kept is allowed
    with pytest.raises(FairMoeError, match="too aggressive.*top_k=3.*≤ 0.7500"):
        LAYOUT.total(Budget(0.8), 3)  # 10 of 12 would leave 2 < top_k
    with pytest.raises(FairMoeError, match="raise --budget"):
        LAYOUT.total(Budget(0.01), 3)


def test_min_keep_never_below_the_floor():
    assert LAYOUT.min_keep(None) == 3 and LAYOUT.min_keep(5) == 5
    with pytest.raises(FairMoeError, match="--min-keep 2 is below 3"):
        LAYOUT.min_keep(2)
    with pytest.raises(FairMoeError, match="too aggressive.*--min-keep 5"):
        LAYOUT.total(Budget(0.75), 5)


def test_groups_keep_their_minimum():
    grouped = UnitLayout("experts", 12, (0, 1), 3, "the router selects top_k=3", groups=3, min_per_group=2)
    assert grouped.max_removable(3) == 6  # each group of 4 keeps 2
    with pytest.raises(FairMoeError, match="groups"):
        grouped.total(Budget(0.75), 3)


def test_layout_round_trips_through_scores_metadata():
    assert UnitLayout.from_meta(LAYOUT.to_meta()) == LAYOUT

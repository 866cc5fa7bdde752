"""ToD, budget matching, uniform and global allocation against hand-computed cases."""

import pytest
import torch

from fair_moe import allocation as allocate
from fair_moe.core.errors import FairMoeError

# Layer A: removal order 0..5, protection order [0, 5, 4, 3, 2, 1] → ToD = [1, 1/2, 1/3, 1/2, 4/5, 1] (not monotone).
U_A = torch.tensor([0.0, 1, 2, 3, 4, 5])
R_A = torch.tensor([6.0, 1, 2, 3, 4, 5])
# Layer B: removal order 0..5, protection order [5, 0, 1, 2, 3, 4] → ToD = [0, 1/2, 2/3, 3/4, 4/5, 1].
U_B = torch.tensor([0.0, 1, 2, 3, 4, 5])
R_B = torch.tensor([0.0, 0, 0, 0, 0, 9])


def test_tod_curve_non_monotone_hand_computed():
    curve = allocate.tod_curve(U_A, R_A, 6)
    assert curve.tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 2, 4 / 5, 1])
    assert allocate.tod_curve(U_B, R_B, 6).tolist() == pytest.approx([0, 1 / 2, 2 / 3, 3 / 4, 4 / 5, 1])


def test_tod_count_scans_every_k():
    curve = allocate.tod_curve(U_A, R_A, 6)
    assert allocate.tod_count(curve, 0.4) == 3  # ToD(4) = 0.5 > 0.4 but ToD(3) = 1/3 ≤ 0.4
    assert allocate.tod_count(curve, 0.5) == 4  # ToD(1) = 1 does not stop the scan
    assert allocate.tod_count(curve, 0.3) == 0
    assert allocate.tod_count(curve, 1.0) == 6  # α at the top end: every removable unit
    assert allocate.tod_count(curve, 0.0) == 0  # α at the bottom end
    assert allocate.tod_count(allocate.tod_curve(U_B, R_B, 6), 0.0) == 1


def test_tod_ties_break_towards_lower_ids():
    u = torch.tensor([1.0, 1.0, 0.0, 0.0])  # removal order [2, 3, 0, 1]
    r = torch.ones(4)  # protection order [0, 1, 2, 3]
    assert allocate.removal_order(u).tolist() == [2, 3, 0, 1]
    assert allocate.protection_order(r).tolist() == [0, 1, 2, 3]
    assert allocate.tod_curve(u, r, 4).tolist() == pytest.approx([0, 0, 2 / 3, 1])


def test_n_max_caps_the_curve():
    assert len(allocate.tod_curve(U_A, R_A, 2)) == 2
    assert allocate.tod_count(allocate.tod_curve(U_A, R_A, 2), 1.0) == 2


def test_match_budget_hands_out_remainder_by_lowest_protection():
    u, r = torch.stack([U_A, U_B]), torch.stack([R_A, R_B])
    # α* = 1/2: k(α*-ε) = [3, 1]; both layers jump at 1/2. Next candidates: A's unit 3 (R=3), B's unit 1 (R=0) → B.
    result = allocate.tod(u, r, [6, 6], total=5)
    assert result.alpha == pytest.approx(0.5)
    assert result.removed == [[0, 1, 2], [0, 1]]
    assert allocate.tod(u, r, [6, 6], total=6).removed == [[0, 1, 2, 3], [0, 1]]
    # α* = 1/3: k(α*-ε) = [0, 1]; only A jumps (to 3) and takes the remaining 3.
    result = allocate.tod(u, r, [6, 6], total=4)
    assert result.alpha == pytest.approx(1 / 3)
    assert result.counts == [3, 1]


@pytest.mark.parametrize("total", range(0, 13))
def test_match_budget_is_exact(total):
    u, r = torch.stack([U_A, U_B]), torch.stack([R_A, R_B])
    assert sum(allocate.tod(u, r, [6, 6], total=total).counts) == total


def test_match_budget_exact_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    u, r = torch.rand(8, 60, generator=gen), torch.rand(8, 60, generator=gen)
    for total in (1, 17, 120, 240, 448):
        result = allocate.tod(u, r, [56] * 8, total=total)
        assert sum(result.counts) == total
        assert max(result.counts) <= 56


def test_budget_above_capacity_is_refused():
    with pytest.raises(FairMoeError):
        allocate.tod(torch.stack([U_A, U_B]), torch.stack([R_A, R_B]), [2, 2], total=5)


def test_k_is_non_decreasing_in_alpha():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        u, r = torch.rand(16, generator=gen), torch.rand(16, generator=gen)
        curve = allocate.tod_curve(u, r, 12)
        ks = [allocate.tod_count(curve, a) for a in torch.linspace(0, 1, 101).tolist()]
        assert ks == sorted(ks)


def test_tolerance_mode_uses_alpha_directly():
    result = allocate.tod(torch.stack([U_A, U_B]), torch.stack([R_A, R_B]), [6, 6], alpha=0.5)
    assert result.counts == [4, 2]
    assert result.alpha == 0.5


def test_uniform_takes_lowest_u_per_layer():
    u = torch.tensor([[3.0, 1, 2, 0], [0.5, 0.4, 0.3, 0.2]])
    assert allocate.uniform(u, 2).removed == [[3, 1], [3, 2]]


def test_global_normalises_by_layer_mean_and_respects_n_max():
    u = torch.tensor([[1.0, 2, 3, 4], [10.0, 10, 40, 40]])  # normalised: [.4 .8 1.2 1.6], [.4 .4 1.6 1.6]
    assert allocate.global_(u, [2, 2], 3).removed == [[0], [0, 1]]
    assert allocate.global_(u, [2, 2], 4).removed == [[0, 1], [0, 1]]
    assert allocate.global_(u, [2, 1], 3).removed == [[0, 1], [0]]  # layer 1 is full after one

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


# Hand-computed. Admissible k at α (k = 0 always): A: 1/3 → {3}, 1/2 → {2, 3, 4}, 4/5 → +5, 1 → +1, +6;
# B: 0 → {1}, 1/2 → {1, 2}, 2/3 → +3, 3/4 → +4, 4/5 → +5, 1 → +6. α* is the least α at which admissible
# counts sum to the total; then the fewest layers leave their largest admissible k, then the least R removed.
HAND = {
    1: ([0, 1], 0.0),      # B's k = 1 has ToD 0
    2: ([0, 2], 1 / 2),    # nothing sums to 2 below 1/2; (0, 2) leaves only A off its k = 4, (2, 0) both
    3: ([3, 0], 1 / 3),    # A's k = 3 (ToD 1/3); B stays at 0 rather than removing its most protected unit
    4: ([3, 1], 1 / 3),    # both at their largest admissible k
    5: ([3, 2], 1 / 2),    # (3, 2) and (4, 1) each leave one layer off; A's 4th unit has R = 3 > B's 2nd R = 0
    6: ([4, 2], 1 / 2),
    9: ([4, 5], 4 / 5),    # (4, 5) removes R 12, (5, 4) removes R 16
    11: ([6, 5], 1.0),
}


@pytest.mark.parametrize("total", sorted(HAND))
def test_exact_budget_tod_hand_cases(total):
    counts, alpha = HAND[total]
    result = allocate.tod(torch.stack([U_A, U_B]), torch.stack([R_A, R_B]), [6, 6], total=total)
    assert result.counts == counts and result.alpha == pytest.approx(alpha)
    assert result.removed[0] == list(range(counts[0]))  # units always go in removal order


def _brute_force_alpha(curves, total):
    """The least ToD value (or 0) admitting an exact total, by enumerating every combination of counts."""
    import itertools

    values = sorted({0.0, *[float(v) for c in curves for v in c]})
    for alpha in values:
        options = [[0] + [k + 1 for k, v in enumerate(c.tolist()) if v <= alpha] for c in curves]
        if any(sum(combo) == total for combo in itertools.product(*options)):
            return alpha
    return None


def test_every_layer_honours_the_tolerance_it_reports():
    """Random scores, many budgets: totals exact, ToD(k_l) ≤ α* in every layer, α* the least that allows it."""
    gen = torch.Generator().manual_seed(0)
    for draw in range(40):
        layers, n, n_max = 4, 10, 8
        u, r = torch.rand(layers, n, generator=gen), torch.rand(layers, n, generator=gen)
        curves = [allocate.tod_curve(u[i], r[i], n_max) for i in range(layers)]
        for total in range(0, layers * n_max + 1, 3):
            result = allocate.tod(u, r, [n_max] * layers, total=total)
            assert sum(result.counts) == total
            for curve, k in zip(curves, result.counts, strict=True):
                assert k == 0 or curve[k - 1] <= result.alpha + 1e-12, (draw, total)
            if total and draw < 8:  # brute force is exponential: a few draws suffice
                assert result.alpha == pytest.approx(_brute_force_alpha(curves, total))


def test_grouped_tod_honours_the_tolerance_in_steps():
    gen = torch.Generator().manual_seed(3)
    u, r = torch.rand(3, 12, generator=gen), torch.rand(3, 12, generator=gen)
    for total in (3, 9, 15, 24):
        result = allocate.tod(u, r, [9, 9, 9], total=total, groups=3)
        assert sum(result.counts) == total and all(c % 3 == 0 for c in result.counts)
        for i, c in enumerate(result.counts):
            curve = allocate.tod_curve(u[i], r[i], 9, groups=3)
            assert c == 0 or curve[c // 3 - 1] <= result.alpha + 1e-12


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


def test_global_divides_by_the_layer_mean_not_its_max():
    # Layer A: mean 3 → [.33 .33 .33 3]; max 9 would give [.11 .11 .11 1].
    # Layer B: mean 4 → [.25 1.25 1.25 1.25]; max 5 would give [.2 1 1 1].
    # By the mean B's unit 0 (.25) is the cheapest; by the max A's units (.11) would be.
    u = torch.tensor([[1.0, 1, 1, 9], [1.0, 5, 5, 5]])
    assert allocate.global_(u, [3, 3], 1).removed == [[], [0]]
    assert allocate.global_(u, [3, 3], 4).removed == [[0, 1, 2], [0]]

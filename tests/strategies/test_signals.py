"""Signal strategies on hand-made statistics: each signal's formula, the registry, and the exact W1 distance."""

import pytest
import scipy.stats
import torch

from fair_moe.core.statistics import SignalStatistics
from fair_moe.strategies.signals import REMOVAL_SIGNALS, compute_signals
from fair_moe.strategies.signals.wasserstein_distance import max_pairwise_wasserstein, wasserstein_1d


def _stats(**fields):
    taylor = torch.tensor([[-3.0, 1.0, 0.5], [2.0, -0.25, 0.0]], dtype=torch.float64)
    return SignalStatistics(layer_indices=[1, 3], taylor=taylor, num_classes=2, seed=5, **fields)


def test_signals_are_their_formulas():
    count = torch.tensor([[4.0, 0.0, 2.0], [1.0, 3.0, 5.0]], dtype=torch.float64)
    gated = torch.tensor([[2.0, 0.0, 3.0], [0.5, 0.3, 1.0]], dtype=torch.float64)
    norm = torch.tensor([[8.0, 0.0, 6.0], [1.0, 0.9, 5.0]], dtype=torch.float64)
    samples = [torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64),
               torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)]
    removal, protection = compute_signals(_stats(count=count, gated_norm=gated, output_norm=norm,
                                                 class_samples=lambda row: samples))
    expected_reap = torch.tensor([[0.5, 0.0, 1.5], [0.5, 0.1, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(removal["reap"], expected_reap)  # Σ g‖f‖ / routed tokens, 0 where unrouted
    assert torch.equal(removal["frequency"], count) and torch.equal(removal["ean"], norm)
    assert removal["wasserstein"].tolist() == [[1.0, 0.0, 2.0]] * 2  # one sample per class: |a − b|
    assert protection.tolist() == [[3.0, 1.0, 0.5], [2.0, 0.25, 0.0]]  # |signed sum|
    expected = torch.rand((2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(removal["random"], expected)
    # consensus: each signal's rank in its layer (0 lowest .. 1 highest, ties share their mean), averaged.
    # layer 1 — reap 0.5/0/1.5 → ½ 0 1; frequency 4/0/2 → 1 0 ½; ean 8/0/6 → 1 0 ½; wasserstein 1/0/2 → ½ 0 1
    # layer 3 — reap 0.5/0.1/0.2 → 1 0 ½; frequency 1/3/5 → 0 ½ 1; ean 1/0.9/5 → ½ 0 1; wasserstein as layer 1
    expected_consensus = torch.tensor([[3 / 4, 0.0, 3 / 4], [2 / 4, 1 / 8, 7 / 8]], dtype=torch.float64)
    torch.testing.assert_close(removal["consensus"], expected_consensus, rtol=0, atol=1e-15)


def test_consensus_ranks_share_ties_and_skip_what_is_not_computable():
    from fair_moe.strategies.signals.consensus import normalised_ranks

    ranks = normalised_ranks(torch.tensor([[2.0, 2.0, 0.0, 5.0, 2.0]], dtype=torch.float64))
    assert ranks.tolist() == [[0.5, 0.5, 0.0, 1.0, 0.5]]  # the three 2s hold ranks 1, 2, 3 → 2 of 4
    count = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    norm = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
    one_class = SignalStatistics(layer_indices=[0], taylor=torch.zeros(1, 3, dtype=torch.float64), num_classes=1,
                                 seed=0, count=count, gated_norm=count.clone(), output_norm=norm,
                                 class_samples=lambda row: [torch.zeros(1, 3)])
    removal, _ = compute_signals(one_class)
    assert "wasserstein" not in removal  # one class: reap (= 1 everywhere), frequency and ean only
    assert removal["consensus"].tolist() == [[(0.5 + 1 + 0) / 3, (0.5 + 0 + 1) / 3, (0.5 + 0.5 + 0.5) / 3]]
    alone = REMOVAL_SIGNALS.get("consensus").compute(one_class)  # on its own, it computes its constituents itself
    assert torch.equal(alone, removal["consensus"])
    only_norm = SignalStatistics(layer_indices=[0], taylor=torch.zeros(1, 3), num_classes=1, seed=0, output_norm=norm)
    assert "consensus" not in compute_signals(only_norm)[0]  # ean alone is no consensus


def test_a_signal_needs_what_it_reads():
    removal, _ = compute_signals(_stats())  # a vision-like pass: Taylor only, no classes, no routing
    assert sorted(removal) == ["random"]
    vision = ("taylor", "class_samples")
    assert [s.name for s in REMOVAL_SIGNALS if s.available(vision)] == ["wasserstein", "random"]  # no consensus of one
    one_class = SignalStatistics(layer_indices=[0], taylor=torch.zeros(1, 3), num_classes=1, seed=0,
                                 class_samples=lambda row: [torch.zeros(1, 3)])
    assert "wasserstein" not in compute_signals(one_class)[0]


def test_wasserstein_vectorised_matches_scipy_on_random_data():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 9, generator=gen) * torch.rand(9, generator=gen)
    b = torch.randn(53, 9, generator=gen) + 0.5
    got = wasserstein_1d(a, b)
    for j in range(9):
        assert got[j].item() == pytest.approx(
            scipy.stats.wasserstein_distance(a[:, j].numpy(), b[:, j].numpy()), rel=1e-9
        )
    c = torch.rand(41, 9, generator=gen) * 3
    best = max_pairwise_wasserstein([a, b, c])
    for j in range(9):
        cols = [x[:, j].numpy() for x in (a, b, c)]
        pairs = [scipy.stats.wasserstein_distance(cols[i], cols[k]) for i in range(3) for k in range(i + 1, 3)]
        assert best[j].item() == pytest.approx(max(pairs), rel=1e-9)

"""Exact 1-D Wasserstein-1 distances, vectorised over units (columns)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fair_moe.core.lazy import lazy_module

torch = lazy_module("torch")

if TYPE_CHECKING:
    from torch import Tensor


def wasserstein_1d(a: Tensor, b: Tensor) -> Tensor:
    """W1 between the empirical distributions of every column of ``a [n, U]`` and ``b [m, U]`` → [U].

    Uses the quantile form W1 = ∫₀¹ |Q_a(p) − Q_b(p)| dp. Both quantile functions are step functions
    with breaks at i/n and j/m; on the merged breaks (kept as integers over n·m to stay exact) each
    piece is a gather from the sorted columns, so the whole thing is one sort and one gather per input.
    """
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        raise ValueError("wasserstein_1d needs at least one sample on each side")
    a_sorted = torch.sort(a.double(), dim=0).values
    b_sorted = torch.sort(b.double(), dim=0).values
    breaks = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))  # p = break / (n m)
    widths = torch.diff(breaks, prepend=torch.zeros(1, dtype=breaks.dtype)).double() / (n * m)
    ia = torch.div(breaks + m - 1, m, rounding_mode="floor") - 1  # ceil(p n) - 1
    ib = torch.div(breaks + n - 1, n, rounding_mode="floor") - 1  # ceil(p m) - 1
    return (widths[:, None] * (a_sorted[ia] - b_sorted[ib]).abs()).sum(0)


def max_pairwise_wasserstein(samples: list[Tensor]) -> Tensor:
    """max over class pairs of W1, per unit: ``samples`` holds one [n_c, U] matrix per class → [U]."""
    if len(samples) < 2:
        raise ValueError("the wasserstein signal needs at least two classes")
    best = torch.zeros(samples[0].shape[1], dtype=torch.float64)
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            best = torch.maximum(best, wasserstein_1d(samples[i], samples[j]))
    return best

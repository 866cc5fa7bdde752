"""Measurements: every token of a stream is scored exactly once, whatever the window and stride."""

import math

import pytest
import torch
from conftest import build_model, tiny_qwen2_moe_config

from fair_moe.metrics import paired_difference, stream_nll


@pytest.mark.parametrize("n,seq_len,stride", [(100, 32, 16), (100, 32, 32), (33, 32, 16), (20, 32, 16), (64, 32, 8)])
def test_every_token_is_scored_once(n, seq_len, stride):
    model = build_model(tiny_qwen2_moe_config(num_hidden_layers=1))
    ids = torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(0))
    nll, scored = stream_nll(model, ids, seq_len, stride)
    windows = math.ceil((n - 1) / seq_len)  # non-overlapping: each window's first token has no context
    assert scored == (n - windows if stride == seq_len else n - 1) and math.isfinite(nll)


def test_paired_difference_is_mean_and_standard_error():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([0.5, 2.5, 2.0, 3.0], dtype=torch.float64)
    mean, se = paired_difference(a, b)  # differences 0.5, -0.5, 1, 1
    assert mean == pytest.approx(0.5) and se == pytest.approx(torch.tensor([0.5, -0.5, 1, 1]).std().item() / 2)


def test_the_dense_references_cross_entropy_is_the_models_own_loss():
    """The judging reference records the dense model's per-window cross-entropy from the same pass: it equals the
    loss transformers computes from the labels, window by window, and survives a split."""
    from fair_moe.metrics import DenseReference

    model = build_model(tiny_qwen2_moe_config(num_hidden_layers=1)).eval()
    ids = torch.randint(1, 97, (5, 24), generator=torch.Generator().manual_seed(3))
    reference = DenseReference(model, ids, batch_size=2)
    with torch.no_grad():
        expected = [model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]
    assert reference.dense_nll.tolist() == pytest.approx(expected, rel=1e-5)
    head, tail = reference.split(2)
    assert torch.equal(torch.cat([head.dense_nll, tail.dense_nll]), reference.dense_nll)

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

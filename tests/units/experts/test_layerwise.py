"""Layer-by-layer recomputation gives the one-pass signals, also with weights offloaded by accelerate."""

import random

import pytest
import torch
from conftest import CharTokenizer, build_model
from families import family_configs
from transformers import AutoModelForCausalLM

from fair_moe.adapters import get_adapter
from fair_moe.calibration.text import CalibrationSource, make_batches
from fair_moe.strategies.signals import compute_signals
from fair_moe.units.experts.calibrate import run_calibration
from fair_moe.units.experts.layerwise import run_calibration_layerwise


def _batches():
    rng = random.Random(2)
    sources = [CalibrationSource(n, ["".join(rng.choice(c) for _ in range(1500))]) for n, c in
               (("a", "abcdefg "), ("b", "tuvwxyz0123 "))]
    return make_batches(CharTokenizer(), sources, samples=4, seq_len=24, batch_size=2, seed=0)


def _assert_same(a, b):
    assert a.tokens == b.tokens
    (removal_a, protection_a), (removal_b, protection_b) = compute_signals(a), compute_signals(b)
    assert set(removal_a) == set(removal_b)
    assert torch.equal(removal_a["frequency"], removal_b["frequency"])
    for name in ("reap", "ean", "wasserstein"):
        torch.testing.assert_close(removal_a[name], removal_b[name], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(protection_a, protection_b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss", "qwen3_next"])
def test_layerwise_equals_one_pass(family):
    model = build_model(family_configs()[family], seed=6)
    layers = get_adapter(model.config).moe_layers(model)
    batches = _batches()
    one_pass = run_calibration(model, layers, batches, 2, seed=0, progress=False)
    layerwise = run_calibration_layerwise(model, layers, batches, 2, seed=0, progress=False)
    _assert_same(one_pass, layerwise)
    assert all(p.grad is None for p in model.parameters())


def test_layerwise_with_disk_offload(tmp_path):
    """Weights larger than the memory given: accelerate offloads them to disk; the signals do not change."""
    config = family_configs()["qwen2_moe"]
    build_model(config, seed=6).save_pretrained(tmp_path / "model")
    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    batches = _batches()
    reference = run_calibration(reference_model, get_adapter(config).moe_layers(reference_model), batches, 2, 0, False)
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", dtype=torch.float32, device_map="auto", max_memory={"cpu": "60KB"},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded
    result = run_calibration_layerwise(offloaded, get_adapter(config).moe_layers(offloaded), batches, 2, 0, False)
    _assert_same(reference, result)
    # the offload hooks survive calibration: the model still runs
    with torch.no_grad():
        assert offloaded(input_ids=batches[0][1]).logits.shape[-1] == config.vocab_size

"""Every signal against a reference computed independently from the model's weights and autograd."""

import random

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from fair_moe.adapters import get_adapter
from fair_moe.calibration.text import CalibrationSource, make_batches
from fair_moe.strategies.signals import compute_signals
from fair_moe.units.experts.calibrate import run_calibration


def _sources():
    rng = random.Random(0)
    return [
        CalibrationSource("a", ["".join(rng.choice("abcdef ") for _ in range(2000))]),
        CalibrationSource("b", ["".join(rng.choice("uvwxyz0123 ") for _ in range(2000))]),
    ]


def _reference(model, batches, num_classes):
    """Frequency, EAN, REAP, per-class routed values and Taylor with parameter autograd."""
    layers = get_adapter(model.config).moe_layers(model)
    captured = {}

    def capture(index):
        def hook(module, args, kwargs=None):
            captured[index] = (args[0].detach(), args[1].detach(), args[2].detach())

        return hook

    handles = [layer.experts.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    E = layers[0].num_experts
    freq = torch.zeros(len(layers), E, dtype=torch.float64)
    ean = torch.zeros_like(freq)
    reap_sum = torch.zeros_like(freq)
    values = [[[[] for _ in range(E)] for _ in range(num_classes)] for _ in layers]
    tokens = [0] * num_classes
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    try:
        for klass, ids in batches:
            tokens[klass] += ids.numel()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for li, layer in enumerate(layers):
                hidden, top_ids, top_w = captured[li]
                experts = layer.experts
                for e in range(E):
                    token, slot = torch.where(top_ids == e)
                    if len(token) == 0:
                        continue
                    x = hidden[token].double()
                    gate, up = (x @ experts.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
                    f = (F.silu(gate) * up) @ experts.down_proj[e].detach().double().T
                    norms = f.norm(dim=-1)
                    g = top_w[token, slot].double()
                    freq[li, e] += len(token)
                    ean[li, e] += norms.sum()
                    reap_sum[li, e] += (g * norms).sum()
                    values[li][klass][e].append(g * norms)
    finally:
        for h in handles:
            h.remove()
    taylor = torch.stack(
        [(layer.experts.down_proj.grad.double() * layer.experts.down_proj.detach().double()).sum(dim=(1, 2)).abs()
         for layer in layers]
    )
    for p in model.parameters():
        p.grad = None
    return freq, ean, reap_sum / freq.clamp_min(1), values, tokens, taylor


@pytest.fixture
def calibrated(tiny_qwen2_moe, char_tokenizer):
    model = tiny_qwen2_moe
    batches = make_batches(char_tokenizer, _sources(), samples=6, seq_len=24, batch_size=2, seed=0)
    layers = get_adapter(model.config).moe_layers(model)
    stats = run_calibration(model, layers, batches, 2, seed=0, progress=False)
    removal, protection = compute_signals(stats)
    return model, batches, removal, protection, stats.tokens


def test_frequency_ean_reap_match_reference(calibrated):
    model, batches, removal, _, tokens = calibrated
    freq, ean, reap, _, _, _ = _reference(model, batches, 2)
    assert tokens == 6 * 24
    assert torch.equal(removal["frequency"], freq)
    assert freq.sum(dim=1).tolist() == [6 * 24 * model.config.num_experts_per_tok] * 3
    torch.testing.assert_close(removal["ean"], ean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(removal["reap"], reap, rtol=1e-5, atol=1e-8)


def test_taylor_matches_parameter_autograd(calibrated):
    model, batches, _, protection, _ = calibrated
    *_, taylor = _reference(model, batches, 2)
    assert (taylor > 0).any()
    torch.testing.assert_close(protection, taylor, rtol=1e-4, atol=1e-9)


def test_wasserstein_matches_scipy_on_routed_values(calibrated):
    model, batches, removal, _, _ = calibrated
    _, _, _, values, tokens, _ = _reference(model, batches, 2)
    for li in range(len(values)):
        for e in range(model.config.num_experts):
            samples = []
            for klass in range(2):
                v = torch.cat(values[li][klass][e]) if values[li][klass][e] else torch.zeros(0, dtype=torch.float64)
                samples.append(torch.cat([v, torch.zeros(tokens[klass] - len(v), dtype=torch.float64)]).numpy())
            expected = scipy.stats.wasserstein_distance(samples[0], samples[1])
            assert removal["wasserstein"][li, e].item() == pytest.approx(expected, rel=1e-6, abs=1e-10)


def test_random_signal_is_seeded(calibrated):
    _, _, removal, _, _ = calibrated
    expected = torch.rand(removal["random"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(removal["random"], expected)


def test_calibration_leaves_model_unchanged(tiny_qwen2_moe, char_tokenizer):
    model = tiny_qwen2_moe
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = get_adapter(model.config).moe_layers(model)
    batches = make_batches(char_tokenizer, _sources(), samples=2, seq_len=16, batch_size=2, seed=0)
    run_calibration(model, layers, batches, 2, seed=0, progress=False)
    assert all("forward" not in vars(layer.experts) for layer in layers)  # patches removed
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients stored
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_instrumented_forward_equals_stock_forward(tiny_qwen2_moe, char_tokenizer):
    """Inside the pass, outputs equal the stock forward's (hooks must not change the model)."""
    from fair_moe.units.experts.calibrate import SignalCollector

    model = tiny_qwen2_moe
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        collector = SignalCollector(get_adapter(model.config).moe_layers(model), 1)
        with collector.instrument():
            during = model(input_ids=ids).logits
    torch.testing.assert_close(during, before, rtol=0, atol=1e-6)


def test_patches_removed_when_the_pass_raises(tiny_qwen2_moe):
    model = tiny_qwen2_moe
    layers = get_adapter(model.config).moe_layers(model)
    bad_batches = [(0, torch.full((1, 8), 10_000))]  # token id beyond the vocabulary → IndexError
    with pytest.raises(IndexError):
        run_calibration(model, layers, bad_batches, 1, seed=0, progress=False)
    assert all("forward" not in vars(layer.experts) for layer in layers)
    assert all(p.requires_grad for p in model.parameters())

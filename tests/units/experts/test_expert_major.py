"""Llama 4's expert-major block: its router returns dense scores, and its experts module runs every expert on every
token, each expert's rows scaled by the token's score for it. fair_moe reads its routing and calls its experts the
way the block does."""

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import CharTokenizer, build_model
from families import all_configs

from fair_moe.adapters import get_adapter
from fair_moe.calibration.text import CalibrationSource, make_batches
from fair_moe.strategies.signals import compute_signals
from fair_moe.units.experts.calibrate import SignalCollector, run_calibration
from fair_moe.units.experts.routing import layer_routing, run_experts

IDS = torch.randint(1, 97, (2, 14), generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def llama4():
    return build_model(all_configs()["llama4_text"], seed=2)


def _expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a Llama 4 layer on rows ``x [n, H]``, in float64, from its weights."""
    experts = layer.experts
    gate, up = (x.double() @ experts.gate_up_proj[e].detach().double()).chunk(2, dim=-1)
    return (up * F.silu(gate)) @ experts.down_proj[e].detach().double()


def test_routing_is_the_routers_own_top_k(llama4):
    layer = get_adapter(llama4.config).moe_layers(llama4)[0]
    x = torch.randn(9, llama4.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores, logits = layer.router(x)
        weights, ids = layer_routing(layer, (scores, logits))
    assert ids.shape == (9, layer.top_k)
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, ids, True)
    assert torch.equal(selected, scores > 0)  # the experts the block sends each token to, and only those
    assert torch.equal(weights, scores.gather(1, ids))


def test_run_experts_is_the_blocks_own_routed_output(llama4):
    """The block's output minus its shared expert equals run(x, ids, weights) of its router's own routing, and the
    sum over the selected experts of expert(weight · x)."""
    layer = get_adapter(llama4.config).moe_layers(llama4)[1]
    x = torch.randn(7, llama4.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer.block(x.unsqueeze(0))
        out = out[0] if isinstance(out, tuple) else out
        routed = out.reshape(-1, x.shape[-1]) - layer.block.shared_expert(x)
        weights, ids = layer_routing(layer, layer.router(x))
        ran = run_experts(layer)(x, ids, weights)
    torch.testing.assert_close(ran, routed, rtol=0, atol=1e-6)
    by_hand = torch.zeros(7, x.shape[-1], dtype=torch.float64)
    for t in range(7):
        for slot in range(layer.top_k):
            e = int(ids[t, slot])
            by_hand[t] += _expert(layer, e, weights[t, slot].double() * x[t : t + 1])[0]
    torch.testing.assert_close(ran.double(), by_hand, rtol=1e-5, atol=1e-6)


def test_instrumented_forward_equals_stock_forward(llama4):
    with torch.no_grad():
        before = llama4(input_ids=IDS).logits
        with SignalCollector(get_adapter(llama4.config).moe_layers(llama4), 1).instrument():
            during = llama4(input_ids=IDS).logits
    torch.testing.assert_close(during, before, rtol=0, atol=1e-5)


def test_signals_take_each_experts_contribution_with_gate_one(llama4):
    """frequency counts the router's top-k; ean sums ‖f_e(g·x)‖ over routed tokens, and reap, with the gate inside
    the expert's input taken as 1, is its mean."""
    rng = random.Random(0)
    sources = [CalibrationSource(n, ["".join(rng.choice(c) for _ in range(1200))])
               for n, c in (("a", "abcdef "), ("b", "uvwxyz0123 "))]
    batches = make_batches(CharTokenizer(), sources, samples=4, seq_len=16, batch_size=2, seed=0)
    layers = get_adapter(llama4.config).moe_layers(llama4)
    seen = {}
    handles = [layer.router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out)))
               for i, layer in enumerate(layers)]
    E = layers[0].num_experts
    freq, ean = torch.zeros(len(layers), E, dtype=torch.float64), torch.zeros(len(layers), E, dtype=torch.float64)
    try:
        with torch.no_grad():
            for _, ids in batches:
                llama4(input_ids=ids, use_cache=False)
                for li, layer in enumerate(layers):
                    x, (scores, _) = seen[li]
                    for t, e in zip(*torch.where(scores > 0), strict=True):
                        freq[li, e] += 1
                        ean[li, e] += _expert(layer, int(e), scores[t, e].double() * x[t : t + 1]).norm()
    finally:
        for h in handles:
            h.remove()
    stats = run_calibration(llama4, layers, batches, 2, seed=0, progress=False)
    removal, _ = compute_signals(stats)
    assert torch.equal(removal["frequency"], freq)
    torch.testing.assert_close(removal["ean"], ean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(removal["reap"], ean / freq.clamp_min(1), rtol=1e-5, atol=1e-8)

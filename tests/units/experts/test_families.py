"""Every supported family on a tiny random config: real routing, signals, exact budgets, round trips."""

import copy
import random

import pytest
import torch
from conftest import CharTokenizer, build_model
from families import family_configs, grouped_uneven_plan
from transformers import AutoModelForCausalLM

from fair_moe import PlanSettings, apply_plan, compute_scores, make_plan, save_pruned
from fair_moe.adapters import get_adapter, supported_model_types
from fair_moe.calibration.text import CalibrationSource
from fair_moe.units.experts.routing import masked_experts

FAMILIES = list(family_configs())
IDS = torch.randint(1, 97, (2, 15), generator=torch.Generator().manual_seed(11))


def _sources():
    rng = random.Random(1)
    return [CalibrationSource(n, ["".join(rng.choice(chars) for _ in range(1500))]) for n, chars in
            (("a", "abcdefg "), ("b", "tuvwxyz0123 "))]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(model, scores) for one family; scores from one short calibration pass."""
    model = build_model(family_configs()[request.param], seed=3)
    scores = compute_scores(model, CharTokenizer(), _sources(), samples=4, seq_len=24, batch_size=2, progress=False)
    return request.param, model, scores


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_every_required_family_is_registered():
    assert set(FAMILIES) <= set(supported_model_types())


def test_route_reproduces_the_stock_router(family):
    _, model, _ = family
    adapter = get_adapter(model.config)
    seen = []
    handles = [layer.router.register_forward_hook(lambda m, a, out: seen.append((m, out)))
               for layer in adapter.moe_layers(model)]
    _logits(model)
    for h in handles:
        h.remove()
    assert seen
    for router, out in seen:
        weights, ids = adapter.route(router, adapter.router_logits(out), None)
        assert torch.equal(ids, out[2])
        torch.testing.assert_close(weights, out[1], rtol=0, atol=0)


def test_frequency_is_the_models_own_topk_counts(family):
    """Per expert: how often the router's own top-k ids (its forward output) chose it on the calibration batches."""
    from fair_moe.calibration.text import make_batches

    _, model, scores = family
    adapter = get_adapter(model.config)
    layers = adapter.moe_layers(model)
    assert scores.layer_indices == [layer.index for layer in layers]
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)

    def count(i):
        def hook(module, args, out) -> None:  # the router's own top-k ids, out = (logits, weights, ids)
            counts[i].index_add_(0, out[2].flatten(), torch.ones(out[2].numel(), dtype=torch.float64))

        return hook

    handles = [layer.router.register_forward_hook(count(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for _, ids in make_batches(CharTokenizer(), _sources(), samples=4, seq_len=24, batch_size=2, seed=0):
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(scores.removal["frequency"], counts)
    assert scores.removal["frequency"].sum(dim=1).tolist() == [4 * 24 * layers[0].top_k] * len(layers)


def test_taylor_matches_parameter_autograd(family):
    """R = |Σ ∂L/∂W ⊙ W| over each expert's down projection (weight and, for GPT-OSS, its bias)."""
    _, model, scores = family
    from fair_moe.calibration.text import make_batches

    batches = make_batches(CharTokenizer(), _sources(), samples=4, seq_len=24, batch_size=2, seed=0)
    model.zero_grad()
    for _, ids in batches:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    reference = []
    for layer in get_adapter(model.config).moe_layers(model):
        experts = layer.experts
        total = (experts.down_proj.grad.double() * experts.down_proj.detach().double()).flatten(1).sum(1)
        if hasattr(experts, "down_proj_bias"):
            total += (experts.down_proj_bias.grad.double() * experts.down_proj_bias.detach().double()).sum(1)
        reference.append(total.abs())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scores.protection, torch.stack(reference), rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("budget", [0.25, 0.5])
@pytest.mark.parametrize("allocation", ["tod", "uniform", "global"])
def test_budget_exact_and_groups_stay_selectable(family, budget, allocation):
    _, model, scores = family
    adapter = get_adapter(model.config)
    plan = make_plan(scores, PlanSettings(budget=budget, allocation=allocation))
    e, groups = adapter.num_experts(model.config), adapter.num_groups(model.config)
    per_layer = groups * round(budget * e / groups)
    assert plan.removed_total == len(scores.layer_indices) * per_layer
    size = e // groups
    for kept in plan.kept.values():
        assert len(kept) >= adapter.top_k(model.config)
        per_group = [sum(g * size <= i < (g + 1) * size for i in kept) for g in range(groups)]
        assert len(set(per_group)) == 1 and per_group[0] >= max(1, adapter.min_kept_per_group(model.config))


@pytest.mark.parametrize("kind", ["tod", "uniform", "uneven"])
def test_round_trip_equals_masked_original(family, kind, tmp_path):
    name, model, scores = family
    if kind == "uneven":
        plan = grouped_uneven_plan(model)
    else:
        plan = make_plan(scores, PlanSettings(budget=0.25, allocation=kind))
    with masked_experts(model, plan.kept):
        reference = _logits(model)
    assert (reference - _logits(model)).abs().max() > 1e-4  # the mask changes the output
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, plan=plan)
    stock = plan.is_uniform
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=not stock, dtype=torch.float32)
    if stock:
        assert type(reloaded) is type(model)  # stock class, no remote code
    assert (_logits(reloaded) - reference).abs().max().item() < 1e-4


def test_grouped_budget_that_empties_groups_is_refused(family):
    """3 groups of 4 that must keep ≥ 2 each (top-2 group scores): at most 6 of 12 can go."""
    name, model, scores = family
    adapter = get_adapter(model.config)
    if adapter.num_groups(model.config) == 1:
        pytest.skip("no group-limited routing")
    from fair_moe.core.errors import FairMoeError

    with pytest.raises(FairMoeError, match="groups"):
        make_plan(scores, PlanSettings(budget=0.75, allocation="uniform"))


def _router_output_with_removed(router, adapter, hidden, removed):
    """The router's own forward with the removed experts made unreachable where its own computation allows it:
    a selection bias of -inf where the router has one, else -inf added to the logits its linear layer makes."""
    import contextlib

    import torch.nn.functional as F

    if hasattr(router, "e_score_correction_bias"):
        bias = router.e_score_correction_bias
        saved = bias.clone()
        try:
            bias[removed] = float("-inf")
            return router(hidden)
        finally:
            bias.copy_(saved)
    original = F.linear

    def masked_linear(x, weight, *rest):
        out = original(x, weight, *rest)
        return out.masked_fill(removed, float("-inf")) if weight is router.weight else out

    with contextlib.ExitStack() as stack:
        F.linear = masked_linear
        stack.callback(setattr, F, "linear", original)
        return router(hidden)


def test_route_with_removed_experts_reproduces_the_router_itself(family):
    """Masked routing against the router's own forward on -inf logits (or -inf selection bias): group scores,
    selection biases and renormalisation all come from the family's own code, not from the adapter."""
    _, model, _ = family
    adapter = get_adapter(model.config)
    captured = {}
    layers = adapter.moe_layers(model)
    handles = [layer.router.register_forward_pre_hook(lambda m, a, i=layer.index: captured.update({i: a[0]}))
               for layer in layers]
    _logits(model)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(4)
    for layer in layers:
        groups, size = layer.groups, layer.num_experts // layer.groups
        removed = torch.zeros(layer.num_experts, dtype=torch.bool)
        for g in range(groups):  # one expert per group, so that every group stays selectable
            removed[g * size + int(torch.randint(0, size, (1,), generator=gen))] = True
        with torch.no_grad():
            hidden = captured[layer.index]
            own = _router_output_with_removed(layer.router, adapter, hidden, removed)
            logits = adapter.router_logits(layer.router(hidden))
            weights, ids = adapter.route(layer.router, logits, removed)
        assert not removed[own[2]].any()
        order_own, order_ours = own[2].sort(dim=-1), ids.sort(dim=-1)
        assert torch.equal(order_own.values, order_ours.values)
        torch.testing.assert_close(own[1].gather(1, order_own.indices), weights.gather(1, order_ours.indices),
                                   rtol=1e-5, atol=1e-6)

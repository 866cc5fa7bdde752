"""Every supported family on a tiny random config: real routing, signals, exact budgets, round trips."""

import contextlib
import copy
import random

import pytest
import torch
import transformers
from conftest import CharTokenizer, build_model
from families import all_configs, grouped_uneven_plan

from fair_moe import PlanSettings, apply_plan, compute_scores, make_plan, save_pruned
from fair_moe.adapters import get_adapter, supported_model_types
from fair_moe.calibration.text import CalibrationSource
from fair_moe.units.experts.routing import layer_routing, masked_experts, patched_forward, route

CONFIGS = all_configs()
FAMILIES = list(CONFIGS)
IDS = torch.randint(1, 97, (2, 15), generator=torch.Generator().manual_seed(11))


def _sources():
    rng = random.Random(1)
    return [CalibrationSource(n, ["".join(rng.choice(chars) for _ in range(1500))]) for n, chars in
            (("a", "abcdefg "), ("b", "tuvwxyz0123 "))]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(model, scores) for one family; scores from one short calibration pass."""
    model = build_model(CONFIGS[request.param], seed=3)
    scores = compute_scores(model, CharTokenizer(), _sources(), samples=4, seq_len=24, batch_size=2, progress=False)
    return request.param, model, scores


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_every_family_in_the_matrix_is_listed():
    assert set(FAMILIES) <= set(supported_model_types())


def test_removing_nothing_changes_nothing(family):
    """The mask with every expert kept runs each router's own code untouched: the logits are bit for bit the same."""
    _, model, _ = family
    layers = get_adapter(model.config).moe_layers(model)
    with masked_experts(model, {layer.index: list(range(layer.num_experts)) for layer in layers}):
        masked = _logits(model)
    assert torch.equal(masked, _logits(model))


def test_frequency_is_the_models_own_topk_counts(family):
    """Per expert: how often the router's own top-k ids (its forward output) chose it on the calibration batches."""
    from fair_moe.calibration.text import make_batches

    _, model, scores = family
    adapter = get_adapter(model.config)
    layers = adapter.moe_layers(model)
    assert scores.layer_indices == [layer.index for layer in layers]
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)
    past_routed = torch.zeros(len(layers), dtype=torch.float64)  # slots the router sent past the routed experts

    def count(i):
        def hook(module, args, out) -> None:  # the router's own top-k ids (LongCat's identity experts are not units)
            ids = layer_routing(layers[i], out)[1].flatten()
            past_routed[i] += int((ids >= layers[i].num_experts).sum())
            ids = ids[ids < layers[i].num_experts]
            counts[i].index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))

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
    every_slot = scores.removal["frequency"].sum(dim=1) + past_routed
    assert every_slot.tolist() == [4 * 24 * layers[0].top_k] * len(layers)


def test_taylor_matches_parameter_autograd(family):
    """R = |Σ ∂L/∂W ⊙ W| over each expert's down projection (weight and, for GPT-OSS, its bias), where an expert's
    output is linear in its down projection; where it is not (MuseSpark RMS-normalises each expert's output, so that
    sum is 0 by construction), R is the same first-order estimate of removing the expert's routed output, checked
    against autograd through a per-expert multiplier on the routing weights."""
    _, model, scores = family
    from fair_moe.calibration.text import make_batches

    batches = make_batches(CharTokenizer(), _sources(), samples=4, seq_len=24, batch_size=2, seed=0)
    layers = get_adapter(model.config).moe_layers(model)
    normalised = any(hasattr(layer.experts, "post_expert_norm") for layer in layers)
    multipliers = [torch.ones(layer.num_experts, dtype=torch.float64, requires_grad=True) for layer in layers]
    model.zero_grad()
    with contextlib.ExitStack() as stack:
        if normalised:
            for layer, s in zip(layers, multipliers, strict=True):
                stack.enter_context(patched_forward(layer.experts, _scaled_routing(layer.experts.forward, s)))
        for _, ids in batches:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    reference = []
    for layer, s in zip(layers, multipliers, strict=True):
        experts = layer.experts
        if normalised:
            reference.append(s.grad.abs())
            continue
        total = (experts.down_proj.grad.double() * experts.down_proj.detach().double()).flatten(1).sum(1)
        if hasattr(experts, "down_proj_bias"):
            total += (experts.down_proj_bias.grad.double() * experts.down_proj_bias.detach().double()).sum(1)
        reference.append(total.abs())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scores.protection, torch.stack(reference), rtol=1e-4, atol=1e-10)


def _scaled_routing(original, multiplier):
    """An experts forward whose routing weights are multiplied by ``multiplier[expert]`` (a leaf of ones)."""
    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        scaled = top_k_weights * multiplier[top_k_index].to(top_k_weights.dtype)
        return original(hidden_states, top_k_index, scaled, *args, **kwargs)

    return forward


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
    scale = reference.abs().max().item()  # some tiny models' logits are of order 0.01
    assert (reference - _logits(model)).abs().max() > 1e-4 * scale  # the mask changes the output
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, plan=plan)
    stock = plan.is_uniform
    auto = getattr(transformers, get_adapter(model.config).auto_class(model.config))
    reloaded = auto.from_pretrained(tmp_path, trust_remote_code=not stock, dtype=torch.float32)
    if stock:
        assert type(reloaded) is type(model)  # stock class, no remote code
    assert (_logits(reloaded) - reference).abs().max().item() < 1e-4 * min(1.0, max(scale, 1e-2))


def test_grouped_budget_that_empties_groups_is_refused(family):
    """3 groups of 4 that must keep ≥ 2 each (top-2 group scores): at most 6 of 12 can go."""
    name, model, scores = family
    adapter = get_adapter(model.config)
    if adapter.num_groups(model.config) == 1:
        pytest.skip("no group-limited routing")
    from fair_moe.core.errors import FairMoeError

    with pytest.raises(FairMoeError, match="groups"):
        make_plan(scores, PlanSettings(budget=0.75, allocation="uniform"))


def test_masked_routing_equals_the_sliced_routers_own(family):
    """For every layer, the router's own forward under the mask picks the same experts with the same weights as the
    router of the pruned model (sliced, its count updated) on the same input: group scores, selection biases and
    renormalisation all come from the family's own code, on both sides."""
    _, model, _ = family
    adapter = get_adapter(model.config)
    layers = adapter.moe_layers(model)
    captured = {}
    handles = [layer.router.register_forward_pre_hook(
        lambda m, a, k, i=layer.index: captured.update({i: (a, k)}), with_kwargs=True) for layer in layers]
    _logits(model)
    for h in handles:
        h.remove()
    plan = grouped_uneven_plan(model)
    pruned = apply_plan(copy.deepcopy(model), plan)
    pruned_layers = {layer.index: layer for layer in adapter.moe_layers(pruned)}
    for layer in layers:
        kept = torch.tensor(plan.kept[layer.index])
        removed = torch.ones(layer.num_experts, dtype=torch.bool)
        removed[kept] = False
        args, kwargs = captured[layer.index]
        with torch.no_grad():
            weights, ids = route(layer, args, kwargs, removed)
            own = pruned_layers[layer.index].router(*_for_pruned(args, layer, pruned_layers[layer.index]), **kwargs)
        own_weights, own_ids = layer_routing(layer, own)
        # classes past the routed experts (LongCat's identity experts) follow the kept ones in the pruned router
        tail = layer.structure.router_tail
        assert not torch.cat([removed, torch.zeros(tail, dtype=torch.bool)])[ids].any()
        original_id = torch.cat([kept, torch.arange(layer.num_experts, layer.num_experts + tail)])
        mine, theirs = ids.sort(dim=-1), original_id[own_ids].sort(dim=-1)
        assert torch.equal(mine.values, theirs.values)
        torch.testing.assert_close(weights.gather(1, mine.indices), own_weights.gather(1, theirs.indices),
                                   rtol=1e-5, atol=1e-6)


def _for_pruned(args, layer, pruned_layer):
    """The router's arguments for the pruned layer: a selection bias the block passes in is the pruned block's."""
    swapped = {id(layer.tensor(path)): pruned_layer.tensor(path) for path in layer.structure.selection_biases}
    return tuple(swapped.get(id(a), a) if isinstance(a, torch.Tensor) else a for a in args)


def test_the_check_by_parts_passes_a_right_checkpoint(family, tmp_path):
    """The half-precision fallback of verification (``units/experts/trace.py``) works on every family: the traced
    reference gives the masked original's logits, and on a right uneven checkpoint the reloaded routers score what
    the original's do on the kept experts, choose the same experts, and give the same logits under its routing."""
    from fair_moe.units import UNIT_KINDS

    name, model, _ = family
    unit = UNIT_KINDS.get("experts")
    plan = grouped_uneven_plan(model)
    inputs = {"input_ids": IDS}
    trace = unit.routing_trace(model, inputs, plan.kept, lambda: masked_experts(model, plan.kept))
    with masked_experts(model, plan.kept):
        reference = _logits(model)
    scale = max(reference.abs().max().item(), 1e-2)
    assert (trace.logits - reference).abs().max().item() < 1e-5 * scale
    assert set(trace.layers) == set(plan.kept) and all(layer.scores for layer in trace.layers.values())
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, plan=plan)
    auto = getattr(transformers, get_adapter(model.config).auto_class(model.config))
    reloaded = auto.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    parts = unit.by_parts(reloaded, inputs, plan, trace)
    assert parts.differing == 0 and parts.unexplained == 0 and parts.decisions > 0
    assert parts.router_delta is not None and parts.router_delta < 1e-4 * max(1.0, parts.router_scale)
    assert (parts.outputs - reference).abs().max().item() < 1e-4 * min(1.0, scale)

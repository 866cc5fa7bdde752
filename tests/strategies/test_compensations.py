"""Compensations: fitted per layer, recorded in the plan, folded / streamed into the weights, and equal to
their stated reference (the masked original with the compensation applied) after a reload."""

import copy

import pytest
import torch
from conftest import build_model, tiny_qwen2_moe_config
from families import all_configs, family_configs, grouped_uneven_plan
from transformers import AutoModelForCausalLM

from fair_moe import apply_plan, reference, save_pruned, stream_pruned
from fair_moe.adapters import get_adapter
from fair_moe.core.plan import CompensationRecord, PrunePlan
from fair_moe.strategies import COMPENSATIONS
from fair_moe.strategies.compensations import FitData
from fair_moe.strategies.compensations.router_temperature import TEMPERATURES
from fair_moe.units.experts.routing import masked_experts

IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(8))
FIT = torch.randint(1, 97, (4, 20), generator=torch.Generator().manual_seed(9))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _write(model, plan, out, streamed, tmp_path):
    if streamed:
        model.save_pretrained(tmp_path / "src")
        stream_pruned(model, plan, tmp_path / "src", out)
    else:
        save_pruned(apply_plan(copy.deepcopy(model), plan), out, plan=plan)
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("streamed", [False, True])
def test_router_temperature_round_trip(family, streamed, tmp_path):
    model = build_model(family_configs()[family], seed=5)
    plan = grouped_uneven_plan(model)
    record = COMPENSATIONS.get("router-temperature").fit(model, plan.kept, FitData(FIT))
    full = [i for i, kept in plan.kept.items() if len(kept) == plan.width]
    assert all(record.per_layer[i] == 1.0 for i in full)  # nothing removed: the original routing is best
    assert set(record.per_layer.values()) <= set(TEMPERATURES)
    temperatures = {i: (1.25 if n % 2 else 0.8) for n, i in enumerate(plan.kept)}  # make every layer count
    plan.compensation = CompensationRecord("router-temperature", temperatures)
    with reference(model, plan):
        expected = _logits(model)
    with masked_experts(model, plan.kept):
        assert (expected - _logits(model)).abs().max() > 1e-5
    reloaded = _write(model, plan, tmp_path / "out", streamed, tmp_path)
    assert (_logits(reloaded) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_merge_round_trip(family, tmp_path):
    model = build_model(family_configs()[family], seed=5)
    plan = grouped_uneven_plan(model)
    merge = COMPENSATIONS.get("merge")
    record = merge.fit(model, plan.kept, FitData(FIT))
    for layer, groups in record.per_layer.items():
        removed = set(range(plan.width)) - set(plan.kept[layer])
        for target, members in groups.items():
            assert target in plan.kept[layer] and members[0][0] == target
            assert all(e in removed and w > 0 for e, w in members[1:])
    assert any(record.per_layer.values())
    plan.compensation = record
    plan.save(tmp_path)
    loaded = PrunePlan.load(tmp_path).compensation
    assert {k: {int(t): m for t, m in g.items()} for k, g in loaded.per_layer.items()} == record.per_layer
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with reference(model, plan):
        expected = _logits(model)
        # hand check of one average: the first group of the first layer with a merge
        layer, groups = next((k, g) for k, g in record.per_layer.items() if g)
        target, members = next(iter(groups.items()))
        merged = next(m for m in get_layers(model) if m.index == layer).experts.down_proj[target]
        original = before[next(k for k in before if f"layers.{layer}." in k and k.endswith("experts.down_proj"))]
        want = sum(w * original[e].double() for e, w in members) / sum(w for _, w in members)
        torch.testing.assert_close(merged.double(), want, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # restored on exit
    with masked_experts(model, plan.kept):
        assert (expected - _logits(model)).abs().max() > 1e-6  # the merge changes the model
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path / "out", plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded) - expected).abs().max().item() < 1e-4


def test_merge_is_not_streamable(tmp_path):
    model = build_model(family_configs()["qwen2_moe"], seed=5)
    plan = grouped_uneven_plan(model)
    plan.compensation = CompensationRecord("merge", {})
    from fair_moe.core.errors import FairMoeError

    with pytest.raises(FairMoeError, match="cannot be streamed"):
        stream_pruned(model, plan, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # gpt_oss: down-projection biases are scaled too
def test_layer_scale_compensation_round_trip(family, tmp_path):
    """With scales folded in, the checkpoint equals the masked original with each routed output scaled."""
    model = build_model(family_configs()[family])
    plan = PrunePlan(family, "experts", 12, {0: [4, 7, 9], 1: list(range(12)), 2: [0, 3, 5, 6, 8, 10, 11]}, top_k=3)
    ids = torch.randint(1, 97, (4, 24), generator=torch.Generator().manual_seed(3))
    record = COMPENSATIONS.get("layer-scale").fit(model, plan.kept, FitData(ids))
    scales = record.per_layer
    assert scales[1] == pytest.approx(1.0)  # layer 1 keeps every expert: nothing to compensate
    assert abs(scales[0] - 1.0) > 1e-3
    plan.compensation = record
    with reference(model, plan):
        expected = _logits(model)
    with masked_experts(model, plan.kept):
        unscaled = _logits(model)
    assert (expected - unscaled).abs().max() > 1e-4
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded) - expected).abs().max().item() < 1e-4
    assert PrunePlan.load(tmp_path).compensation.per_layer == pytest.approx(scales)


def test_layer_scale_is_the_least_squares_solution():
    """s = Σ⟨y, ŷ⟩ / Σ‖ŷ‖² computed by hand from the two routed outputs of layer 0."""
    model = build_model(tiny_qwen2_moe_config(num_hidden_layers=1))
    kept = {0: [0, 3, 4, 8, 10]}
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    layer = get_adapter(model.config).moe_layers(model)[0]
    captured = {}
    handle = layer.experts.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = captured["x"]
    def softmax_top_k(logits):  # Qwen2-MoE routing, by hand: softmax over the experts, top-k, no renormalisation
        weights, ids = torch.softmax(logits, dim=-1, dtype=torch.float).topk(layer.top_k, dim=-1)
        return weights.to(x.dtype), ids

    with torch.no_grad():
        logits = torch.nn.functional.linear(x, layer.router.weight)
        removed = torch.ones(12, dtype=torch.bool)
        removed[kept[0]] = False
        w, i = softmax_top_k(logits)
        w2, i2 = softmax_top_k(logits.masked_fill(removed, float("-inf")))
        y, y_hat = layer.experts(x, i, w).double(), layer.experts(x, i2, w2).double()
    expected = (y * y_hat).sum() / (y_hat * y_hat).sum()
    fitted = COMPENSATIONS.get("layer-scale").fit(model, kept, FitData(ids)).per_layer[0]
    assert fitted == pytest.approx(expected.item(), rel=1e-6)


def get_layers(model):
    return get_adapter(model.config).moe_layers(model)


def test_layer_scale_is_refused_where_expert_outputs_are_normalised():
    """MuseSpark RMS-normalises every expert's output after its down projection, so a scale folded there would change
    nothing: an explicit --compensate layer-scale is refused with the reason, and auto does not consider it."""
    from types import SimpleNamespace

    from zoo import zoo_config

    from fair_moe.core.errors import FairMoeError
    from fair_moe.strategies.selection import decide_compensation
    from fair_moe.units import UNIT_KINDS

    layer_scale = COMPENSATIONS.get("layer-scale")
    assert layer_scale.unavailable(build_model(family_configs()["qwen2_moe"])) is None
    model = build_model(zoo_config("muse_spark"))
    assert "post_expert_norm" in layer_scale.unavailable(model)
    layers = get_adapter(model.config).moe_layers(model)
    plan = PrunePlan(model_type=model.config.model_type, unit="experts", width=8,
                     kept={layer.index: list(range(6)) for layer in layers})
    windows = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = SimpleNamespace(calibration_subset=lambda n: windows, selection_ids=windows, meta={})
    with pytest.raises(FairMoeError, match="--compensate layer-scale cannot be applied.*post_expert_norm"):
        decide_compensation(model, UNIT_KINDS.get("experts"), plan, scores, "layer-scale")
    decided = decide_compensation(model, UNIT_KINDS.get("experts"), plan, scores, "auto")
    assert "layer-scale" in decided.settings["compensation_decision"]["not_considered"]
    assert all(row["compensation"] != "layer-scale" for row in decided.settings["compensation_decision"]["candidates"])


@pytest.mark.parametrize("family,norm", [("gemma4", "post_feedforward_layernorm_2"),
                                         ("flex_olmo", "post_feedforward_layernorm"),
                                         ("beam", "post_feedforward_layernorm")])
def test_layer_scale_is_refused_where_a_norm_undoes_it(family, norm):
    """These families RMS-normalise the routed experts' summed output: scaling it by 3 in every layer leaves the
    logits as they were, up to the norm's eps (outputs of a trained model's size: a random tiny model's are near √eps,
    so its down projections are enlarged here), so layer-scale is unavailable there, and says why."""
    model = build_model(all_configs()[family], seed=1)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    layers = get_adapter(model.config).moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.experts.down_proj.mul_(1e5)
        before = model(input_ids=ids, use_cache=False).logits
        handles = [layer.experts.register_forward_hook(lambda m, a, out: out * 3) for layer in layers]
        try:
            after = model(input_ids=ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
    assert (after - before).abs().max().item() < 1e-3 * before.abs().max().item()
    assert f"{norm}, an RMS norm" in COMPENSATIONS.get("layer-scale").unavailable(model)

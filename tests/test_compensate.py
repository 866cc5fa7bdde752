"""Router-temperature compensation: fitted per layer, folded into the router, equal to its stated reference."""

import copy

import pytest
import torch
from conftest import build_model
from families import family_configs
from test_families import _grouped_uneven_plan
from transformers import AutoModelForCausalLM

from fair_moe.compensate import TEMPERATURES, fit_router_temperatures
from fair_moe.masking import masked_experts
from fair_moe.rewrite import apply_plan, layout_of, modeling_source, save_pruned, update_config
from fair_moe.stream import stream_rewrite

IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(8))
FIT = torch.randint(1, 97, (4, 20), generator=torch.Generator().manual_seed(9))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("streamed", [False, True])
def test_router_temperature_round_trip(family, streamed, tmp_path):
    model = build_model(family_configs()[family], seed=5)
    plan = _grouped_uneven_plan(model)
    temperatures = fit_router_temperatures(model, plan.kept_experts, FIT)
    full = [i for i, kept in plan.kept_experts.items() if len(kept) == plan.num_experts]
    assert all(temperatures[i] == 1.0 for i in full)  # nothing removed: the original routing is best
    assert set(temperatures.values()) <= set(TEMPERATURES)
    temperatures = {i: (1.25 if n % 2 else 0.8) for n, i in enumerate(plan.kept_experts)}  # make every layer count
    plan.compensation = {"kind": "router-temperature", "temperatures": temperatures}
    with masked_experts(model, plan.kept_experts, temperatures=temperatures):
        reference = _logits(model)
    with masked_experts(model, plan.kept_experts):
        assert (reference - _logits(model)).abs().max() > 1e-5
    out = tmp_path / "out"
    if streamed:
        model.save_pretrained(tmp_path / "src")
        stream_rewrite(tmp_path / "src", out, plan, progress=False)
        config = copy.deepcopy(model.config)
        update_config(config, plan, layout_of(model))
        config.save_pretrained(out)
        if not plan.is_uniform:
            (out / "modeling_fair_moe.py").write_text(modeling_source(model))
    else:
        save_pruned(apply_plan(copy.deepcopy(model), plan), out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded) - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_merge_round_trip(family, tmp_path):
    from fair_moe.compensate import fit_merges, fold_merges
    from fair_moe.plan import PrunePlan

    model = build_model(family_configs()[family], seed=5)
    plan = _grouped_uneven_plan(model)
    merges = fit_merges(model, plan.kept_experts, FIT)
    for layer, groups in merges.items():
        removed = set(range(plan.num_experts)) - set(plan.kept_experts[layer])
        for target, members in groups.items():
            assert target in plan.kept_experts[layer] and members[0][0] == target
            assert all(e in removed and w > 0 for e, w in members[1:])
    assert any(merges.values())
    plan.compensation = {"kind": "merge", "merges": merges}
    plan.save(tmp_path)
    assert PrunePlan.load(tmp_path).merges == {k: v for k, v in merges.items()}
    reference_model = copy.deepcopy(model)
    fold_merges(reference_model, merges)
    # hand check of one average: the first group of the first layer with a merge
    layer, groups = next((k, g) for k, g in merges.items() if g)
    target, members = next(iter(groups.items()))
    experts = next(m for m in get_layers(model) if m.index == layer).experts
    expected = sum(w * experts.down_proj[e].double() for e, w in members) / sum(w for _, w in members)
    merged = next(m for m in get_layers(reference_model) if m.index == layer).experts.down_proj[target]
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-7)
    with masked_experts(reference_model, plan.kept_experts):
        reference = _logits(reference_model)
    with masked_experts(model, plan.kept_experts):
        assert (reference - _logits(model)).abs().max() > 1e-6  # the merge changes the model
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded) - reference).abs().max().item() < 1e-4


def get_layers(model):
    from fair_moe.adapters import get_adapter

    return get_adapter(model.config).moe_layers(model)

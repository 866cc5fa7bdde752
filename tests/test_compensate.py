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

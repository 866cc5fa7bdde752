"""The core guarantee: pruned model == original with removed experts unreachable, after save → load."""

import copy
import json

import pytest
import torch
from conftest import build_model, tiny_qwen2_moe_config
from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

from fair_moe import apply_plan, save_pruned
from fair_moe.core.plan import PrunePlan
from fair_moe.units.experts.rewrite import MODELING_FILE
from fair_moe.units.experts.routing import masked_experts


def _plan(kept: dict[int, list[int]], num_experts=12, top_k=3) -> PrunePlan:
    return PrunePlan("qwen2_moe", "experts", num_experts, kept, top_k=top_k)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(1, 97, (2, 19), generator=torch.Generator().manual_seed(7))

PLANS = {
    "uniform": {0: [0, 2, 5, 7, 8, 11], 1: [1, 2, 3, 4, 9, 10], 2: [0, 1, 2, 3, 4, 5]},
    "very_uneven": {0: [4, 7, 9], 1: list(range(12)), 2: [0, 3, 5, 6, 8, 10, 11]},
    "one_layer_untouched": {0: list(range(12)), 1: [2, 6, 11], 2: list(range(1, 12))},
}


@pytest.mark.parametrize("name", list(PLANS))
def test_round_trip_equals_masked_original(name, tmp_path):
    model = build_model(tiny_qwen2_moe_config())
    plan = _plan(PLANS[name])
    dense = _logits(model, IDS)
    with masked_experts(model, plan.kept):
        reference = _logits(model, IDS)
    assert (reference - dense).abs().max() > 1e-3  # the mask really changes the model
    pruned = apply_plan(copy.deepcopy(model), plan)
    save_pruned(pruned, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded, IDS) - reference).abs().max().item() < 1e-4
    counts = [layer.mlp.gate.weight.shape[0] for layer in reloaded.model.layers]
    assert counts == [len(PLANS[name][i]) for i in range(3)]


def test_uniform_plan_writes_the_stock_architecture(tmp_path):
    model = build_model(tiny_qwen2_moe_config())
    save_pruned(apply_plan(model, _plan(PLANS["uniform"])), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_experts"] == 6
    assert "auto_map" not in config and "fair_moe_experts_per_layer" not in config
    assert not (tmp_path / MODELING_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(reloaded) is Qwen2MoeForCausalLM


def test_non_uniform_plan_needs_remote_code_and_records_counts(tmp_path):
    model = build_model(tiny_qwen2_moe_config())
    save_pruned(apply_plan(model, _plan(PLANS["very_uneven"])), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fair_moe_experts_per_layer"] == {"0": 3, "1": 12, "2": 7}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fair_moe.FairMoeForCausalLM"
    assert "from transformers import Qwen2MoeForCausalLM as FairMoeBase" in (tmp_path / MODELING_FILE).read_text()
    assert config["architectures"] == ["FairMoeForCausalLM"]  # not the stock class's name: vLLM must not load it
    # Without the remote code the stock class refuses the per-layer shapes loudly instead of loading garbage.
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)


def test_saved_weights_use_per_expert_keys_renumbered(tmp_path):
    from safetensors import safe_open

    model = build_model(tiny_qwen2_moe_config())
    original = model.model.layers[0].mlp.experts.down_proj[9].detach().clone()
    save_pruned(apply_plan(model, _plan(PLANS["very_uneven"])), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert sum(k.startswith("model.layers.0.mlp.experts.") and k.endswith("down_proj.weight") for k in keys) == 3
        # kept ids [4, 7, 9] become 0, 1, 2 in order
        assert torch.equal(f.get_tensor("model.layers.0.mlp.experts.2.down_proj.weight"), original)


def test_plan_with_too_few_experts_is_refused():
    from fair_moe.core.errors import FairMoeError

    model = build_model(tiny_qwen2_moe_config())
    with pytest.raises(FairMoeError, match="top_k"):
        apply_plan(model, _plan({0: [1, 2], 1: list(range(12)), 2: list(range(12))}))

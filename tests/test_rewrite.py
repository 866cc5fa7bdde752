"""The core guarantee: pruned model == original with removed experts unreachable, after save → load."""

import copy
import json

import pytest
import torch
from conftest import build_model, tiny_qwen2_moe_config
from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

from fair_moe.masking import masked_experts
from fair_moe.plan import PrunePlan
from fair_moe.rewrite import MODELING_FILE, apply_plan, save_pruned, write_atomically


def _plan(kept: dict[int, list[int]], num_experts=12, top_k=3) -> PrunePlan:
    return PrunePlan(model_type="qwen2_moe", num_experts=num_experts, top_k=top_k, kept_experts=kept)


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
    with masked_experts(model, plan.kept_experts):
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
    assert "from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM as FairMoeBase" in (
        tmp_path / MODELING_FILE
    ).read_text()
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
    from fair_moe.errors import FairMoeError

    model = build_model(tiny_qwen2_moe_config())
    with pytest.raises(FairMoeError, match="top_k"):
        apply_plan(model, _plan({0: [1, 2], 1: list(range(12)), 2: list(range(12))}))


def test_write_atomically_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"

    def failing(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(out, failing)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        write_atomically(out, lambda f: (_ for _ in ()).throw(RuntimeError("boom")), overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    write_atomically(out, lambda f: (f / "new.txt").write_text("new"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_layer_scale_compensation_round_trip(tmp_path):
    """With scales folded in, the checkpoint equals the masked original with each routed output scaled."""
    from fair_moe.compensate import fit_layer_scales

    model = build_model(tiny_qwen2_moe_config())
    plan = _plan(PLANS["very_uneven"])
    ids = torch.randint(1, 97, (4, 24), generator=torch.Generator().manual_seed(3))
    scales = fit_layer_scales(model, plan.kept_experts, ids)
    assert scales[1] == pytest.approx(1.0)  # layer 1 keeps every expert: nothing to compensate
    assert abs(scales[0] - 1.0) > 1e-3
    plan.compensation = {"kind": "layer-scale", "scales": scales}
    with masked_experts(model, plan.kept_experts, scales=plan.layer_scales):
        reference = _logits(model, IDS)
    with masked_experts(model, plan.kept_experts):
        unscaled = _logits(model, IDS)
    assert (reference - unscaled).abs().max() > 1e-4
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path)
    plan.save(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded, IDS) - reference).abs().max().item() < 1e-4
    assert PrunePlan.load(tmp_path).layer_scales == pytest.approx(scales)


def test_layer_scale_is_the_least_squares_solution():
    """s = Σ⟨y, ŷ⟩ / Σ‖ŷ‖² computed by hand from the two routed outputs of layer 0."""
    from fair_moe.adapters import get_adapter
    from fair_moe.compensate import fit_layer_scales

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
    with torch.no_grad():
        logits = torch.nn.functional.linear(x, layer.router.weight)
        adapter = get_adapter(model.config)
        w, i = adapter.route(layer.router, logits, None)
        removed = torch.ones(12, dtype=torch.bool)
        removed[kept[0]] = False
        w2, i2 = adapter.route(layer.router, logits, removed)
        y, y_hat = layer.experts(x, i, w).double(), layer.experts(x, i2, w2).double()
    expected = (y * y_hat).sum() / (y_hat * y_hat).sum()
    assert fit_layer_scales(model, kept, ids)[0] == pytest.approx(expected.item(), rel=1e-6)

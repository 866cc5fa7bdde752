"""fair_moe_plan.json: what is saved is what is loaded, for every unit kind and for plans written before 0.2."""

import json

from fair_moe.core.plan import CompensationRecord, PrunePlan


def test_expert_plan_round_trip(tmp_path):
    plan = PrunePlan("qwen2_moe", "experts", 12, {0: [5, 1, 2], 3: list(range(12))}, settings={"budget": 0.25},
                     alpha=0.5, base_model="org/model", top_k=3,
                     compensation=CompensationRecord("layer-scale", {0: 0.9, 3: 1.0}, {"fit_windows": 32}))
    plan.save(tmp_path)
    data = json.loads((tmp_path / "fair_moe_plan.json").read_text())
    assert data["kept_experts"] == {"0": [1, 2, 5], "3": list(range(12))}  # sorted ids
    assert data["num_experts"] == 12 and data["top_k"] == 3 and data["removed_total"] == 9
    assert data["kept_counts"] == {"0": 3, "3": 12}
    assert data["compensation"] == {"kind": "layer-scale", "per_layer": {"0": 0.9, "3": 1.0}, "fit_windows": 32}
    loaded = PrunePlan.load(tmp_path)
    assert loaded.kept == {0: [1, 2, 5], 3: list(range(12))}
    assert loaded.compensation == plan.compensation and loaded.top_k == 3 and loaded.unit == "experts"


def test_vision_plan_names_units_not_experts(tmp_path):
    plan = PrunePlan("vit", "heads", 4, {0: [0, 1], 1: [0, 1, 2, 3]})
    plan.save(tmp_path)
    data = json.loads((tmp_path / "fair_moe_plan.json").read_text())
    assert "kept_experts" not in data and "num_experts" not in data and "top_k" not in data
    assert data["kept_units"] == {"0": [0, 1], "1": [0, 1, 2, 3]} and data["width"] == 4 and data["unit"] == "heads"
    assert PrunePlan.load(tmp_path) == plan


def test_plans_written_before_0_2_load(tmp_path):
    old = {"model_type": "qwen2_moe", "num_experts": 8, "top_k": 2, "unit": "experts",
           "kept_experts": {"1": [0, 3]}, "settings": {}, "alpha": None, "base_model": None,
           "compensation": {"kind": "router-temperature", "temperatures": {"1": 1.25}, "fit_windows": 64}}
    (tmp_path / "fair_moe_plan.json").write_text(json.dumps(old))
    plan = PrunePlan.load(tmp_path)
    assert plan.compensation == CompensationRecord("router-temperature", {1: 1.25}, {"fit_windows": 64})
    old_vision = {"model_type": "vit", "num_experts": 20, "top_k": 1, "unit": "units", "kept_units": {"0": [1]}}
    (tmp_path / "fair_moe_plan.json").write_text(json.dumps(old_vision))
    plan = PrunePlan.load(tmp_path)
    assert (plan.unit, plan.width, plan.kept, plan.top_k) == ("neurons", 20, {0: [1]}, None)

"""The Python API: no state left on the model, and the steps compose into what the command line writes."""

import copy
import random

import torch
from conftest import CharTokenizer, build_model, tiny_qwen2_moe_config
from transformers import AutoModelForCausalLM

from fair_moe import PlanSettings, apply_plan, compute_scores, make_plan, prune_model, reference, save_pruned
from fair_moe.calibration.text import CalibrationSource
from fair_moe.strategies import COMPENSATIONS
from fair_moe.strategies.compensations import FitData


def _sources():
    rng = random.Random(3)
    return [CalibrationSource(n, ["".join(rng.choice(c) for _ in range(3000))]) for n, c in
            (("a", "abcdef "), ("b", "uvwxyz01 "))]


def _fair_moe_attributes(model) -> list[str]:
    found = []
    for name, module in [("", model), *model.named_modules()]:
        found += [f"{name}.{k}" for k in vars(module) if "fair_moe" in k or k == "forward"]
    return found


def test_no_state_travels_on_the_model():
    model = build_model(tiny_qwen2_moe_config(), seed=1)
    scores = compute_scores(model, CharTokenizer(), _sources(), samples=8, seq_len=32, batch_size=4, progress=False)
    plan = make_plan(scores, PlanSettings(budget=0.5, allocation="tod"))
    plan.compensation = COMPENSATIONS.get("layer-scale").fit(model, plan.kept, FitData(scores.calibration_ids))
    with reference(model, plan):
        pass
    assert _fair_moe_attributes(model) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_prune_model_equals_its_reference(tmp_path):
    model = build_model(tiny_qwen2_moe_config(), seed=1)
    original = copy.deepcopy(model)
    pruned, plan = prune_model(model, CharTokenizer(), _sources(), budget=0.5, samples=8, seq_len=32,
                               progress=False)
    assert plan.removed_total == 18 and _fair_moe_attributes(pruned) == []
    ids = torch.randint(1, 97, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), reference(original, plan):
        expected = original(input_ids=ids).logits
    save_pruned(pruned, tmp_path, plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=not plan.is_uniform,
                                                    dtype=torch.float32)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() < 1e-4
    assert (tmp_path / "fair_moe_plan.json").is_file()


def test_apply_plan_folds_then_slices():
    model = build_model(tiny_qwen2_moe_config(), seed=1)
    scores = compute_scores(model, CharTokenizer(), _sources(), samples=8, seq_len=32, batch_size=4, progress=False)
    plan = make_plan(scores, PlanSettings(budget=0.25, allocation="uniform"))
    plan.compensation = COMPENSATIONS.get("layer-scale").fit(model, plan.kept, FitData(scores.calibration_ids))
    layer0 = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    apply_plan(model, plan)
    kept = plan.kept[0]
    torch.testing.assert_close(model.model.layers[0].mlp.experts.down_proj,
                               layer0[kept] * plan.compensation.per_layer[0])

"""The shipped demo model: it is what `make demo` prunes, so the core guarantee is checked on it too."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fair_moe import PlanSettings, apply_plan, compute_scores, make_plan, save_pruned
from fair_moe.calibration import BUNDLED_CALIB_DIR, BUNDLED_HELDOUT_DIR, DEMO_MODEL_DIR
from fair_moe.calibration.text import bundled_sources
from fair_moe.units.experts.routing import masked_experts


@pytest.fixture(scope="module")
def demo():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    scores = compute_scores(model, tokenizer, bundled_sources(), samples=6, seq_len=128, batch_size=3, progress=False)
    return model, tokenizer, scores


def test_demo_model_matches_the_issue_spec():
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe"
    assert config["num_experts"] >= 24 and config["num_experts_per_tok"] == 4 and config["num_hidden_layers"] >= 4
    assert config["shared_expert_intermediate_size"] > 0
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20
    assert len(list(BUNDLED_CALIB_DIR.glob("*.txt"))) >= 2 and len(list(BUNDLED_HELDOUT_DIR.glob("*.txt"))) >= 2


def test_heldout_text_is_not_calibration_text():
    # Licence texts share boilerplate paragraphs across packages by nature, so only code and docs are
    # held to the line-overlap rule; the split itself is by document for every domain.
    for held in (BUNDLED_HELDOUT_DIR / "python.txt", BUNDLED_HELDOUT_DIR / "docs.txt"):
        calib = (BUNDLED_CALIB_DIR / held.name).read_text()
        lines = [line for line in held.read_text().splitlines() if len(line) > 60]
        shared = sum(line in calib for line in lines)
        assert shared < 0.2 * len(lines), held.name  # boilerplate lines may recur, documents do not


@pytest.mark.parametrize("allocation", ["tod", "uniform", "global", "very_uneven"])
def test_demo_round_trip_equals_masked_original(demo, allocation, tmp_path):
    model, tokenizer, scores = demo
    if allocation == "very_uneven":  # layer 0 keeps only top_k experts, layer 1 all of them
        plan = make_plan(scores, PlanSettings(budget=0.5, allocation="uniform"))
        plan.kept = {0: [3, 9, 17, 30], 1: list(range(32)), 2: list(range(0, 32, 3)), 3: list(range(1, 32, 2))}
    else:
        plan = make_plan(scores, PlanSettings(budget=0.5, allocation=allocation))
        assert plan.removed_total == 4 * 16
    text = (BUNDLED_HELDOUT_DIR / "python.txt").read_text()[:2000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :96]
    with torch.no_grad(), masked_experts(model, plan.kept):
        reference = model(input_ids=ids).logits
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, tokenizer, plan, dtype=torch.float16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - reference).abs().max().item() < 1e-4


def test_tod_plan_on_the_demo_model_is_uneven(demo):
    _, _, scores = demo
    plan = make_plan(scores, PlanSettings(budget=0.5, allocation="tod"))
    assert len(set(plan.kept_counts.values())) > 1

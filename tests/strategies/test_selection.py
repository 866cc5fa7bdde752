"""--allocation auto: candidates at the exact budget, scored on windows the calibration never saw."""

import math

import pytest
import torch
from conftest import CharTokenizer, build_model, tiny_qwen2_moe_config

from fair_moe import Budget, compute_scores, prune_model
from fair_moe.calibration.text import CalibrationSource, make_calibration_split
from fair_moe.core.errors import FairMoeError
from fair_moe.metrics import mean_loss
from fair_moe.strategies.selection import select_plan
from fair_moe.units import UNIT_KINDS
from fair_moe.units.experts.routing import masked_experts

EXPERTS = UNIT_KINDS.get("experts")


def _sources():
    import random

    rng = random.Random(5)
    return [CalibrationSource(n, ["".join(rng.choice(c) for _ in range(3000))])
            for n, c in (("a", "abcdef "), ("b", "uvwxyz01 "))]


def test_selection_windows_are_disjoint_from_calibration():
    batches, selection = make_calibration_split(CharTokenizer(), _sources(), samples=8, seq_len=32, batch_size=2,
                                                seed=0, selection_samples=6)
    calib = {tuple(row.tolist()) for _, b in batches for row in b}
    assert len(calib) == 8 and len(selection) == 6
    assert not calib & {tuple(row.tolist()) for row in selection}
    # asking for selection windows does not change the calibration windows
    plain, _ = make_calibration_split(CharTokenizer(), _sources(), samples=8, seq_len=32, batch_size=2, seed=0,
                                      selection_samples=0)
    assert [b.tolist() for _, b in plain] == [b.tolist() for _, b in batches]


@pytest.fixture(scope="module")
def model_and_scores():
    model = build_model(tiny_qwen2_moe_config(), seed=2)
    scores = compute_scores(model, CharTokenizer(), _sources(), samples=8, seq_len=32, batch_size=4, progress=False,
                            selection_samples=6)
    return model, scores


def test_auto_keeps_the_lowest_loss_candidate(model_and_scores):
    model, scores = model_and_scores
    plan = select_plan(model, EXPERTS, scores, Budget(0.5), progress=False).plan
    candidates = plan.settings["candidates"]
    assert {(c["allocation"], c["removal"]) for c in candidates} == {
        (a, r) for a in ("tod", "uniform", "global") for r in ("reap", "frequency", "ean", "wasserstein")}
    best = min(c["loss"] for c in candidates)
    with masked_experts(model, plan.kept):
        assert mean_loss(model, scores.selection_ids) == pytest.approx(best, rel=1e-9)
    assert plan.removed_total == 3 * 6
    assert plan.settings["allocation"] == "auto"
    assert (plan.settings["selected"]["allocation"], plan.settings["selected"]["removal"]) in {
        (c["allocation"], c["removal"]) for c in candidates if c["loss"] == best}
    assert math.isfinite(plan.settings["selection"]["dense_loss"])


def test_auto_without_selection_text_is_refused(model_and_scores):
    model, scores = model_and_scores
    scores = type(scores)(scores.layer_indices, scores.removal, scores.protection, scores.meta, None)
    with pytest.raises(FairMoeError, match="auto"):
        select_plan(model, EXPERTS, scores, Budget(0.5), progress=False)


def test_prune_model_api_with_auto():
    model = build_model(tiny_qwen2_moe_config(), seed=2)
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    pruned, plan = prune_model(model, CharTokenizer(), _sources(), budget=0.25, allocation="auto", samples=8,
                               seq_len=32, progress=False)
    assert plan.removed_total == 9 and plan.settings["allocation"] == "auto"
    assert pruned(input_ids=ids).logits.shape[-1] == 97


def test_selection_windows_are_carved_from_calibration_when_text_is_short():
    import random

    rng = random.Random(9)
    short = [CalibrationSource("s", ["".join(rng.choice("abc ") for _ in range(10 * 32))])]  # 10 windows in all
    batches, selection = make_calibration_split(CharTokenizer(), short, samples=10, seq_len=32, batch_size=4, seed=0,
                                                selection_samples=3)
    calib = [tuple(row.tolist()) for _, b in batches for row in b]
    assert len(calib) == 7 and len(selection) == 3
    assert not set(calib) & {tuple(row.tolist()) for row in selection}


def test_fit_windows_come_from_every_source(model_and_scores):
    _, scores = model_and_scores
    subset = scores.calibration_subset(4)
    first, last = scores.calibration_ids[0], scores.calibration_ids[-1]
    assert len(subset) == 4
    assert torch.equal(subset[0], first) and torch.equal(subset[-1], last)  # both ends: both sources


@pytest.mark.parametrize("with_loss,kept", [(1.0, False), (3.0, True)])
def test_compensate_auto_keeps_a_compensation_only_when_it_lowers_the_held_out_loss(model_and_scores, monkeypatch,
                                                                                    with_loss, kept):
    """Made-up held-out losses: 2.0 without the scales, 3.0 (worse) or 1.0 (better) with them."""
    from fair_moe.strategies import selection
    from fair_moe.strategies.planning import make_plan

    model, scores = model_and_scores
    losses = {None: 2.0, "layer-scale": 4.0 - with_loss}  # with_loss 1 → 3.0 (worse), 3 → 1.0 (better)
    monkeypatch.setattr(selection, "judged_loss",
                        lambda model, unit, kept, record, ids, bs: losses[record.kind if record else None])
    plan = make_plan(scores, Budget(0.5), "uniform", "ean")
    plan = selection.decide_compensation(model, EXPERTS, plan, scores, "auto")
    assert (plan.compensation is not None) == kept
    if kept:
        assert plan.compensation.kind == "layer-scale"
        assert plan.compensation.fit["selection_loss_with"] == 1.0
    else:
        rejected = plan.settings["compensation_rejected"]
        assert rejected["kind"] == "layer-scale" and rejected["selection_loss_with"] == 3.0

"""Verification by parts: in half precision a tie that the sliced router breaks differently from the masked original
cannot fail a right checkpoint, and a wrong checkpoint still fails."""

import pytest
import torch

from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.units import UNIT_KINDS
from fair_moe.units.experts.trace import (
    LayerTrace,
    RoutingTrace,
    differing_decisions,
    new_positions,
    to_original,
    to_sliced,
    unexplained_decisions,
)
from fair_moe.workflow import writing
from tests.conftest import build_model, tiny_qwen2_moe_config

KEPT = [0, 2, 3, 5, 7, 9, 10, 11]  # experts 2 and 5 are kept and tie exactly (the same router row)


def test_ids_map_between_the_original_and_the_sliced_numbering():
    assert new_positions([7, 2, 4], 8).tolist() == [-1, -1, 0, -1, 1, -1, -1, 2]
    sliced = torch.tensor([[0, 2], [1, 3]])  # 3: a padding slot one past the 3 kept experts
    assert to_original(sliced, [2, 4, 7], 8).tolist() == [[2, 7], [4, 8]]  # the padding slot stays one past the end
    assert to_original(sliced, [1, 2, 5], 8).tolist() == [[1, 5], [2, 8]]  # never a removed expert's id
    assert to_sliced(torch.tensor([[2, 7], [4, 8]]), [2, 4, 7], 8).tolist() == [[0, 2], [1, 3]]
    assert torch.equal(to_original(sliced, None, 8), sliced)


def test_only_ties_within_the_slack_explain_a_differing_decision():
    """Layer 0 keeps experts [1, 3, 4, 6] of 8, top-1; scores are on the kept experts in that order."""
    scores = torch.tensor([[2.0, 2.0, 0.0, 0.0],   # 1 and 3 tie: choosing 3 instead of 1 is explained
                           [3.0, 1.0, 0.0, 0.0],   # 1 beats 3 by 2: choosing 3 is not
                           [0.0, 0.0, 1.05, 1.0],  # 4 beats 6 by 0.05: explained by a slack of 0.1 only
                           [0.0, 5.0, 0.0, 0.0]])  # the same choice on both sides
    original = RoutingTrace(torch.zeros(1), {0: LayerTrace(torch.tensor([[1], [1], [4], [3]]), torch.ones(4, 1),
                                                           [scores], num_experts=8)})
    reloaded = RoutingTrace(torch.zeros(1), {0: LayerTrace(torch.tensor([[3], [3], [6], [3]]), torch.ones(4, 1),
                                                           [scores], num_experts=4)})
    kept = {0: [1, 3, 4, 6]}
    assert differing_decisions(original, reloaded) == (3, 4)
    assert unexplained_decisions(original, reloaded, kept, slack=0.1) == 1
    assert unexplained_decisions(original, reloaded, kept, slack=0.0) == 2
    reloaded.layers[0].ids[0, 0] = 8  # a padding slot cannot be placed on the scores
    assert unexplained_decisions(original, reloaded, kept, slack=0.1) == 2


def _width_dependent_topk(full_width: int):
    """torch.topk whose ties go to the lowest index over ``full_width`` columns and to the highest over any other
    width: what an unspecified tie-break may do over the masked router's E columns and the sliced one's E'."""
    real_sort = torch.sort

    def topk(input, k, dim=-1, largest=True, sorted=True, **_):
        flip = input.shape[dim] != full_width
        x = input.flip(dim) if flip else input
        order = real_sort(x, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        if flip:
            order = input.shape[dim] - 1 - order
        return torch.return_types.topk((input.gather(dim, order), order))

    return topk


def _tied_model():
    config = tiny_qwen2_moe_config(num_experts_per_tok=1)
    model = build_model(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # experts 2 and 5 tie on every token; the others score 0; 5 = −3 × 2
            gate, experts = layer.mlp.gate.weight, layer.mlp.experts
            gate[5] = gate[2]
            gate[[0, 1, 3, 4, 6, 7, 8, 9, 10, 11]] = 0.0
            experts.gate_up_proj[5] = experts.gate_up_proj[2]
            experts.down_proj[5] = -3 * experts.down_proj[2]
            experts.down_proj[2] *= 3
    plan = PrunePlan("qwen2_moe", "experts", 12, {i: list(KEPT) for i in range(3)}, top_k=1)
    return model, plan


def _write(model, plan, folder, monkeypatch, corrupt=None):
    unit = UNIT_KINDS.get("experts")
    monkeypatch.setattr(torch, "topk", _width_dependent_topk(12))
    if corrupt is not None:
        real_apply = unit.apply

        def apply(model, plan):
            real_apply(model, plan)
            corrupt(model)

        monkeypatch.setattr(unit, "apply", apply)
    options = writing.WriteOptions(save_dtype=torch.bfloat16, progress=False)
    writing.write_checkpoint(folder, unit, model, None, plan, None, None, options)


def test_a_tie_broken_differently_by_the_sliced_router_passes_by_parts(tmp_path, monkeypatch, caplog):
    model, plan = _tied_model()
    caplog.set_level("INFO", logger="fair_moe.checkpoint.verify")
    _write(model, plan, tmp_path / "out", monkeypatch)
    by_parts = [r.getMessage() for r in caplog.records if "verified by parts" in r.getMessage()]
    assert len(by_parts) == 1  # the plain comparison failed: the tie was broken differently
    differing, decisions = map(int, by_parts[0].split(": ", 1)[1].split(" token")[0].split(" of "))
    assert 0 < differing and decisions == 3 * 24  # 3 layers × 24 probe tokens


def test_the_plain_comparison_fails_on_the_same_tie_without_the_parts(tmp_path, monkeypatch):
    """The case is real: with the check by parts taken away, the same right checkpoint is refused."""
    model, plan = _tied_model()
    monkeypatch.setattr(writing, "compare_by_parts", lambda parts, expected, what, error: (_ for _ in ()).throw(error))
    with pytest.raises(FairMoeError, match="does not match the masked original"):
        _write(model, plan, tmp_path / "out", monkeypatch)


def _scale_expert(model):
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[1].mul_(3.0)  # sliced position 1 = original expert 2


def _move_router_row(model):
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight[1] += 0.5  # original expert 2's row: its tie with 5 is gone


@pytest.mark.parametrize("corrupt", [_scale_expert, _move_router_row])
def test_a_wrong_checkpoint_still_fails_by_parts(tmp_path, monkeypatch, corrupt):
    model, plan = _tied_model()
    with pytest.raises(FairMoeError, match="checked by parts"):
        _write(model, plan, tmp_path / "out", monkeypatch, corrupt)


def test_slots_a_block_computes_itself_are_put_back_past_the_routed_experts():
    """LongCat's block (transformers ≥ 5.25) hands its experts module each identity-expert slot re-pointed at a
    routed expert with weight exactly 0: those slots are no routing of that expert; a module that computes its tail
    itself, or a layer without a tail, keeps its ids as given."""
    from types import SimpleNamespace

    from fair_moe.units.experts.routing import as_routed

    ids = torch.tensor([[3, 0], [1, 2]])
    weights = torch.tensor([[0.7, 0.0], [0.4, 0.6]])

    def layer(router_tail: int, experts_tail: int) -> SimpleNamespace:
        return SimpleNamespace(num_experts=4, structure=SimpleNamespace(router_tail=router_tail,
                                                                        experts_tail=experts_tail))

    assert as_routed(layer(2, 0), ids, weights).tolist() == [[3, 4], [1, 2]]
    assert as_routed(layer(2, 2), ids, weights).tolist() == [[3, 0], [1, 2]]
    assert as_routed(layer(0, 0), ids, weights).tolist() == [[3, 0], [1, 2]]

"""ZAYA: the router's logits come out of an MLP whose last layer scores E experts and a skip class, and balancing
biases added to the probabilities choose the top-k. A removed expert must stay unreachable whatever its bias."""

import copy

import torch
from conftest import build_model
from families import all_configs, grouped_uneven_plan
from transformers import AutoModelForCausalLM

from fair_moe import apply_plan, reference, save_pruned
from fair_moe.adapters import get_adapter
from fair_moe.units.experts.routing import ExpertsCall, masked_experts

IDS = torch.randint(1, 97, (2, 15), generator=torch.Generator().manual_seed(2))


def _zaya_with_biases():
    """A tiny ZAYA whose balancing biases favour, in every layer that loses experts, one the plan removes."""
    model = build_model(all_configs()["zaya"], seed=1)
    plan = grouped_uneven_plan(model)
    for layer in get_adapter(model.config).moe_layers(model):
        biases = layer.router.balancing_biases
        biases[: layer.num_experts] = torch.linspace(-0.1, 0.1, layer.num_experts)
        if plan.removed(layer.index):
            biases[plan.removed(layer.index)[0]] = 5.0  # far above any probability gap: first if reachable
    return model, plan


def test_the_router_is_its_mlps_logits_layer_and_its_biases_select():
    model, _ = _zaya_with_biases()
    structure = get_adapter(model.config).structure(model.config)
    assert structure.logits_weight == "gate.router_mlp.out_proj.weight" and structure.router_tail == 1
    assert structure.selection_biases == ("gate.balancing_biases",)
    assert "gate.num_router_classes" in structure.tail_count_attributes


def test_a_removed_expert_with_the_largest_bias_is_never_chosen_and_the_checkpoint_equals_it(tmp_path):
    model, plan = _zaya_with_biases()
    chosen: dict[int, torch.Tensor] = {}

    def tap(call: ExpertsCall) -> None:
        chosen[call.layer.index] = call.ids

    with torch.no_grad(), masked_experts(model, plan.kept, tap):
        model(input_ids=IDS, use_cache=False)
    for layer, ids in chosen.items():
        routed = ids[ids < plan.width]
        assert routed.numel() and set(routed.tolist()) <= set(plan.kept[layer])
    with torch.no_grad(), masked_experts(model, None, tap):  # unmasked, the biased expert wins everywhere
        model(input_ids=IDS, use_cache=False)
    pruned = [layer for layer in chosen if plan.removed(layer)]
    assert pruned and all((chosen[layer] == plan.removed(layer)[0]).any() for layer in pruned)
    with reference(model, plan), torch.no_grad():
        expected = model(input_ids=IDS, use_cache=False).logits
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert (reloaded(input_ids=IDS, use_cache=False).logits - expected).abs().max().item() < 1e-4

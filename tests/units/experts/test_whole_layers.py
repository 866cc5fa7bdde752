"""MoE layers kept whole (DeepSeek-V4's hash-routed layers: experts chosen from a fixed token-id table, so none can be
made unreachable): not units, not in the budget, untouched in the checkpoint, and the config still builds them with
every expert."""

import json

import pytest
import torch
from conftest import CharTokenizer, write_checkpoint
from families import all_configs
from safetensors.torch import load_file
from test_families import _sources
from transformers import AutoModelForCausalLM

from fair_moe import apply_plan, compute_scores, prune, reference, save_pruned, stream_pruned
from fair_moe.adapters import get_adapter
from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.strategies.planning import make_plan

IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    """A tiny deepseek_v4 checkpoint (layer 0 hash-routed, layers 1 and 2 learned routers), its model and scores."""
    folder = tmp_path_factory.mktemp("dsv4") / "src"
    write_checkpoint(folder, all_configs()["deepseek_v4"], seed=4)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)  # the table a real checkpoint ships: every token a set of experts
    table = model.model.layers[0].mlp.gate.tid2eid
    table.copy_(torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(table.shape[0])]))
    model.save_pretrained(folder)
    scores = compute_scores(model, CharTokenizer(), _sources(), samples=4, seq_len=24, batch_size=2, progress=False)
    return folder, model, scores


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def test_hash_layers_are_kept_whole_and_out_of_the_budget(hashed):
    _, model, scores = hashed
    adapter = get_adapter(model.config)
    assert [layer.index for layer in adapter.moe_layers(model)] == [1, 2]
    assert adapter.whole_counts(model.config) == {0: 8}
    plan = make_plan(scores, Budget(0.5), "uniform", "frequency")
    assert plan.whole == {0: 8} and plan.kept_counts == {1: 4, 2: 4}
    assert plan.removed_total == 8 and not plan.is_uniform and plan.largest_count == 8
    assert PrunePlan.from_dict(json.loads(plan.to_json())).whole == {0: 8}


@pytest.mark.parametrize("streamed", [False, True])
def test_checkpoint_keeps_the_hash_layer_as_it_was(hashed, tmp_path, streamed):
    folder, model, scores = hashed
    plan = make_plan(scores, Budget(0.5), "uniform", "frequency")
    with reference(model, plan):
        expected = _logits(model)
    out = tmp_path / "out"
    if streamed:
        stream_pruned(model, plan, folder, out)
    else:
        import copy

        save_pruned(apply_plan(copy.deepcopy(model), plan), out, plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 8 and config["fair_moe_experts_per_layer"] == {"1": 4, "2": 4}
    source, written = load_file(folder / "model.safetensors"), {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    layer0 = [k for k in source if k.startswith("model.layers.0.ffn.")]  # the MoE block, in its on-disk names
    assert any("tid2eid" in k for k in layer0) and any("experts" in k for k in layer0)
    for key in layer0:
        assert torch.equal(written[key], source[key]), key
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8
    assert reloaded.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4
    assert (_logits(reloaded) - expected).abs().max().item() < 1e-4


def test_a_plan_that_does_not_keep_the_hash_layer_whole_is_refused(hashed):
    _, model, scores = hashed
    plan = make_plan(scores, Budget(0.5), "uniform", "frequency")
    plan.whole = {}
    with pytest.raises(FairMoeError, match=r"keeps MoE layers \[0\] whole \(hash-routed"):
        apply_plan(model, plan)


def test_the_card_and_the_command_line_say_so(hashed, tmp_path, capsys):
    folder, _, _ = hashed
    calib = tmp_path / "a.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)
    args = ["--model", folder, "--calib-file", calib, "--samples", "4", "--seq-len", "32", "--batch-size", "2",
            "--budget", "0.5", "--allocation", "uniform", "--compensate", "none"]
    assert prune.main([str(a) for a in [*args, "--layout", "stock", "--out", tmp_path / "stock"]]) == 2
    assert "keeps its MoE layers [0] whole" in capsys.readouterr().err
    assert not (tmp_path / "stock").exists()
    assert prune.main([str(a) for a in [*args, "--out", tmp_path / "out"]]) == 0
    printed = capsys.readouterr().out
    assert "(kept whole)" in printed and "this model keeps layer 0 whole" in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "removed 8 of 16 routed experts" in card and "layer 0 keeps all 8 routed experts" in card
    assert "0: 8 (kept whole), 1: 4, 2: 4" in card


def test_the_dry_run_shows_the_hash_layer_kept_whole(hashed, tmp_path, capsys):
    folder, _, _ = hashed
    assert prune.main(["--model", str(folder), "--budget", "0.5", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "MoE layers kept whole (not pruned): 0" in printed
    assert "    0  whole               8" in printed and "    1  moe                 8" in printed
    assert "remove 8 routed experts in total" in printed

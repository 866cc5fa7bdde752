"""The streaming rewriter: source shards in, pruned shards out, for every family's on-disk format."""

import json

import pytest
import torch
import transformers
from conftest import build_model, tiny_qwen2_moe_config
from families import all_configs, grouped_uneven_plan

from fair_moe import reference, stream_pruned
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import CompensationRecord, PrunePlan
from fair_moe.strategies import COMPENSATIONS

IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


CONFIGS = all_configs()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_streamed_checkpoint_equals_masked_original(family, tmp_path):
    """Every supported family, its own key format on disk (many shards), an uneven plan with layer scales."""
    from fair_moe.adapters import get_adapter

    model = build_model(CONFIGS[family], seed=4)
    source, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(source, max_shard_size="20KB")  # many shards
    assert len(list(source.glob("*.safetensors"))) > 3
    plan = grouped_uneven_plan(model)
    scales = {index: 0.9 + 0.05 * n for n, index in enumerate(plan.kept)}
    if COMPENSATIONS.get("layer-scale").unavailable(model) is None:  # MuseSpark normalises each expert's output
        plan.compensation = CompensationRecord("layer-scale", scales)
    with reference(model, plan):
        expected = _logits(model)
    stats = stream_pruned(model, plan, source, out, max_shard_bytes=40_000)
    assert stats["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert stats["written_bytes"] < stats["source_bytes"]
    auto = getattr(transformers, get_adapter(model.config).auto_class(model.config))
    reloaded = auto.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert (_logits(reloaded) - expected).abs().max().item() < 1e-4


def test_index_lists_every_written_tensor(tmp_path):
    from safetensors import safe_open

    model = build_model(tiny_qwen2_moe_config())
    model.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    plan = PrunePlan("qwen2_moe", "experts", 12, {0: [1, 2, 3], 1: list(range(12)), 2: [0, 5, 6, 7]}, top_k=3)
    stream_pruned(model, plan, tmp_path / "src", tmp_path / "out", max_shard_bytes=50_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            stored.update({k: shard for k in f.keys()})
    assert stored == index["weight_map"]
    assert not [k for k in stored if ".layers.0.mlp.experts.3." in k]  # layer 0 keeps 3 → ids 0..2
    assert sum(".layers.2.mlp.experts." in k and k.endswith("down_proj.weight") for k in stored) == 4
    assert not list((tmp_path / "out").glob(".part-*"))


def test_a_plan_that_does_not_fit_the_checkpoint_is_refused(tmp_path):
    model = build_model(tiny_qwen2_moe_config())
    model.save_pretrained(tmp_path / "src")
    plan = PrunePlan("qwen2_moe", "experts", 12, {0: [1, 2, 3], 1: list(range(12)), 7: [0, 1, 2]}, top_k=3)
    with pytest.raises(FairMoeError, match="layer 7"):
        stream_pruned(model, plan, tmp_path / "src", tmp_path / "out")


def test_a_router_stored_transposed_is_sliced_along_its_expert_axis(tmp_path):
    """ergo stores its router ``[hidden, E]`` (the loader transposes it) and a per-expert norm scale ``[E, hidden]``
    inside its experts module: the streamed checkpoint keeps the kept experts' columns of the one, rows of the other,
    in the layout they were stored in."""
    from safetensors.torch import load_file

    model = build_model(all_configs()["ergo"], seed=4)
    model.save_pretrained(tmp_path / "src")
    plan = grouped_uneven_plan(model)
    stream_pruned(model, plan, tmp_path / "src", tmp_path / "out")
    source = load_file(tmp_path / "src" / "model.safetensors")
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(shard))
    for layer, kept in plan.kept.items():
        head = f"layers.{layer}.feed_forward."
        assert source[head + "gate_kernel"].shape == (32, 8)
        assert torch.equal(written[head + "gate_kernel"], source[head + "gate_kernel"][:, kept])
        assert torch.equal(written[head + "expert_output_norm.scale"], source[head + "expert_output_norm.scale"][kept])

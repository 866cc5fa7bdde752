"""Router KD: only the kept experts' router rows change, and the checkpoint equals the masked original whose
router rows are the learned ones — for every family, uniform and uneven plans, in memory and streamed."""

import copy

import pytest
import torch
from conftest import build_model
from families import all_configs, family_configs, grouped_uneven_plan
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fair_moe import apply_plan, reference, save_pruned, stream_pruned
from fair_moe.adapters import get_adapter
from fair_moe.core.plan import PrunePlan
from fair_moe.strategies import COMPENSATIONS
from fair_moe.strategies.compensations import FitData

KD = COMPENSATIONS.get("router-kd")
IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(8))
FIT = torch.randint(1, 97, (8, 20), generator=torch.Generator().manual_seed(9))
QUICK = {"steps": 4, "eval_every": 1, "patience": 10, "lr": 0.2}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _uniform_plan(model) -> PrunePlan:
    """Every layer keeps the same count (stock class), a different set in each layer, every group alike."""
    adapter = get_adapter(model.config)
    e, groups = adapter.num_experts(model.config), adapter.num_groups(model.config)
    size = e // groups
    kept = {layer.index: sorted(set(range(e)) - {g * size + (n + g) % size for g in range(groups)})
            for n, layer in enumerate(adapter.moe_layers(model))}
    return PrunePlan(model.config.model_type, "experts", e, kept, top_k=adapter.top_k(model.config),
                     whole=adapter.whole_counts(model.config))


def _fit(model, plan, **options):
    return KD.fit(model, plan.kept, FitData(FIT, batch_size=4, seed=0, options={**KD.parse_options(()), **options}))


# ergo stores its router transposed on disk ([hidden, E]): the streamed rows are written back in that layout;
# llama4_text's block is expert-major (dense router scores, every expert on every token); zaya's logits come out of
# a router MLP and score a skip class after the experts
KD_FAMILIES = {**family_configs(), **{name: all_configs()[name] for name in ("ergo", "llama4_text", "zaya")}}


@pytest.mark.parametrize("family", list(KD_FAMILIES))
@pytest.mark.parametrize("layout", ["uniform", "uneven"])
def test_checkpoint_equals_masked_original_with_learned_rows(family, layout, tmp_path):
    model = build_model(KD_FAMILIES[family], seed=5)
    plan = _uniform_plan(model) if layout == "uniform" else grouped_uneven_plan(model)
    plan.compensation = _fit(model, plan, **QUICK)
    # A random tiny model barely notices the pruning, so the learned rows sit near the originals: move them
    # further so that the equality below is about the learned rows, whatever training found.
    gen = torch.Generator().manual_seed(1)
    for entry in plan.compensation.per_layer.values():
        assert set(entry) - {"kept"}
        for name in sorted(set(entry) - {"kept"}):
            entry[name] = entry[name] + 0.3 * torch.randn(entry[name].shape, generator=gen)
    with reference(model, plan):
        expected = _logits(model)
    model.save_pretrained(tmp_path / "src")
    for streamed in (False, True):
        out = tmp_path / ("streamed" if streamed else "memory")
        if streamed:
            stream_pruned(model, plan, tmp_path / "src", out)
        else:
            save_pruned(apply_plan(copy.deepcopy(model), plan), out, plan=plan)
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not plan.is_uniform,
                                                        dtype=torch.float32)
        if plan.is_uniform:
            assert type(reloaded) is type(model)  # the stock class: only router tensors changed
        assert (_logits(reloaded) - expected).abs().max().item() < 1e-4


def test_only_the_kept_rows_of_the_router_change():
    model = build_model(family_configs()["gpt_oss"], seed=5)  # a router with a bias
    plan = grouped_uneven_plan(model)
    record = _fit(model, plan, **QUICK)
    folded = copy.deepcopy(model)
    KD.fold(folded, record)
    for before, after in zip(get_adapter(model.config).moe_layers(model),
                             get_adapter(model.config).moe_layers(folded), strict=True):
        removed = sorted(set(range(plan.width)) - set(plan.kept[before.index]))
        for name in ("weight", "bias"):
            a, b = getattr(before.router, name).detach(), getattr(after.router, name).detach()
            assert torch.equal(a[removed], b[removed])
            if before.index in record.per_layer:
                assert torch.equal(b[plan.kept[before.index]], record.per_layer[before.index][name])
            else:  # a layer that keeps every expert is not trained
                assert torch.equal(a, b)
        for p, q in zip(before.experts.parameters(), after.experts.parameters(), strict=True):
            assert torch.equal(p, q)


def test_zero_steps_equals_no_compensation(tmp_path):
    model = build_model(family_configs()["qwen2_moe"], seed=5)
    plan = grouped_uneven_plan(model)
    plain = copy.deepcopy(plan)
    plan.compensation = _fit(model, plan, steps=0)
    assert plan.compensation.fit["steps"] == 0
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path / "kd", plan=plan)
    save_pruned(apply_plan(copy.deepcopy(model), plain), tmp_path / "none", plan=plain)
    with safe_open(str(tmp_path / "kd" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "none" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.fixture(scope="module")
def demo_plan():
    """The trained demo model, half its experts removed: a pruning the model notices."""
    from fair_moe.calibration import DEMO_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    kept = {i: list(range(0, 32, 2)) if i % 2 else list(range(16, 32)) for i in range(4)}
    windows = torch.randint(5, 4000, (8, 64), generator=torch.Generator().manual_seed(3))
    return model, PrunePlan("qwen2_moe", "experts", 32, kept, top_k=4), windows


@pytest.mark.parametrize("objective", ["kl", "local"])
def test_training_lowers_the_held_out_loss_and_repeats_with_the_seed(demo_plan, objective):
    model, plan, windows = demo_plan
    options = {**KD.parse_options(()), "objective": objective, "steps": 6, "eval_every": 2, "lr": 0.05}
    first = KD.fit(model, plan.kept, FitData(windows, batch_size=4, seed=0, options=options))
    second = KD.fit(model, plan.kept, FitData(windows, batch_size=4, seed=0, options=options))
    for i, entry in first.per_layer.items():
        torch.testing.assert_close(entry["weight"], second.per_layer[i]["weight"], rtol=0, atol=1e-6)
    assert first.fit["held_out_final"] < first.fit["held_out_initial"]
    assert first.fit["options"]["objective"] == objective and first.fit["best_step"] > 0
    assert first.fit["options"] == {**KD.parse_options(()), "objective": objective, "steps": 6, "eval_every": 2,
                                    "lr": 0.05}  # the plan names every option the fit ran with
    assert set(first.per_layer) == {0, 1, 2, 3}


def test_learned_rows_are_saved_beside_the_plan(tmp_path):
    model = build_model(family_configs()["qwen2_moe"], seed=5)
    plan = grouped_uneven_plan(model)
    plan.compensation = _fit(model, plan, **QUICK)
    plan.save(tmp_path)
    assert (tmp_path / "fair_moe_compensation.safetensors").is_file()
    loaded = PrunePlan.load(tmp_path).compensation
    for i, entry in plan.compensation.per_layer.items():
        assert loaded.per_layer[i]["kept"] == entry["kept"]
        assert torch.equal(loaded.per_layer[i]["weight"], entry["weight"])
    (tmp_path / "fair_moe_compensation.safetensors").unlink()
    from fair_moe.core.errors import FairMoeError

    with pytest.raises(FairMoeError, match="fair_moe_compensation.safetensors"):
        PrunePlan.load(tmp_path)


def test_save_pruned_in_half_precision_records_the_rows_it_wrote(tmp_path):
    """save_pruned(dtype=float16) stores rounded router rows; the plan beside them records those, not the float32
    rows of the fit (the caller's plan is left as it was)."""
    from safetensors.torch import load_file

    model = build_model(family_configs()["qwen2_moe"], seed=5)
    plan = _uniform_plan(model)
    plan.compensation = _fit(model, plan, **QUICK)
    rows = {i: entry["weight"].clone() for i, entry in plan.compensation.per_layer.items()}
    save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path, plan=plan, dtype=torch.float16)
    written, saved = load_file(tmp_path / "model.safetensors"), PrunePlan.load(tmp_path).compensation
    for i, entry in saved.per_layer.items():
        router = written[f"model.layers.{i}.mlp.gate.weight"]
        assert router.dtype == torch.float16 and torch.equal(entry["weight"], router.float())
        assert torch.equal(plan.compensation.per_layer[i]["weight"], rows[i])
        assert not torch.equal(rows[i], router.float())  # the fit's rows were not float16 values to begin with


def test_unknown_option_is_refused():
    from fair_moe.core.errors import FairMoeError

    with pytest.raises(FairMoeError, match="steps"):
        KD.parse_options(("stepz=3",))
    with pytest.raises(FairMoeError, match="not a int"):
        KD.parse_options(("steps=many",))


@pytest.mark.parametrize("family", list(family_configs()))
def test_cached_teacher_logits_equal_the_dense_forward(family):
    from fair_moe.strategies.compensations.router_kd import TeacherLogits

    model = build_model(family_configs()[family], seed=5)
    teacher = TeacherLogits(model, FIT, batch_size=3)
    assert teacher.cached
    index = torch.tensor([6, 1, 4])
    with torch.no_grad():
        expected = model(input_ids=FIT[index], use_cache=False).logits
    torch.testing.assert_close(teacher(index), expected, rtol=1e-5, atol=1e-5)


def test_teacher_runs_the_forward_where_logits_are_more_than_the_head_output():
    """granitemoe divides its head's output by ``logits_scaling``: the cached head input would give the wrong
    teacher, so every call runs the dense forward."""
    from fair_moe.strategies.compensations.router_kd import TeacherLogits

    config = copy.deepcopy(family_configs()["granitemoe"])
    config.logits_scaling = 4.0
    model = build_model(config, seed=5)
    teacher = TeacherLogits(model, FIT, batch_size=3)
    assert not teacher.cached
    index = torch.tensor([2, 7])
    with torch.no_grad():
        expected = model(input_ids=FIT[index], use_cache=False).logits
    torch.testing.assert_close(teacher(index), expected, rtol=0, atol=0)


def test_the_teacher_cache_leaves_the_learned_rows_as_they_were(demo_plan, monkeypatch):
    """The cache only saves forwards: the rows trained with it equal those trained with a dense forward per step."""
    from fair_moe.strategies.compensations import router_kd

    model, plan, windows = demo_plan
    options = {**KD.parse_options(()), "steps": 6, "eval_every": 2, "lr": 0.05}
    cached = KD.fit(model, plan.kept, FitData(windows, batch_size=4, seed=0, options=options))
    monkeypatch.setattr(router_kd.TeacherLogits, "_capture", lambda self, batch_size: None)
    forward = KD.fit(model, plan.kept, FitData(windows, batch_size=4, seed=0, options=options))
    assert cached.fit["teacher_cached"] and not forward.fit["teacher_cached"]
    assert cached.fit["best_step"] == forward.fit["best_step"] > 0
    for i, entry in cached.per_layer.items():
        torch.testing.assert_close(entry["weight"], forward.per_layer[i]["weight"], rtol=0, atol=1e-5)
    assert cached.fit["held_out_final"] == pytest.approx(forward.fit["held_out_final"], rel=1e-4)


def test_the_fit_does_not_depend_on_the_batch_size(demo_plan):
    """--batch-size is a memory knob: a step's pieces run that many at a time and their gradients add up, so the
    learned rows are the same (up to summation order) whatever it is."""
    model, plan, windows = demo_plan
    options = {**KD.parse_options(()), "steps": 4, "eval_every": 2, "lr": 0.05, "pieces": 4}
    whole = KD.fit(model, plan.kept, FitData(windows, batch_size=4, seed=0, options=options))
    split = KD.fit(model, plan.kept, FitData(windows, batch_size=1, seed=0, options=options))
    assert whole.fit["best_step"] == split.fit["best_step"] > 0
    for i, entry in whole.per_layer.items():
        torch.testing.assert_close(entry["weight"], split.per_layer[i]["weight"], rtol=0, atol=1e-5)
    assert whole.fit["train_loss_last"] == pytest.approx(split.fit["train_loss_last"], rel=1e-5)

"""The command line end to end on a tiny checkpoint, and every bad input it must refuse cleanly."""

import json
import math

import pytest
import torch
from conftest import build_model, tiny_qwen2_moe_config, train_tiny_tokenizer, write_checkpoint
from transformers import AutoModelForCausalLM, LlamaConfig

from fair_moe import prune, reference
from fair_moe.cli import prune as cli_prune
from fair_moe.core.plan import PrunePlan
from fair_moe.core.scores import SCORES_FILE, Scores
from fair_moe.strategies import COMPENSATIONS
from fair_moe.units.experts.routing import masked_experts
from fair_moe.workflow import prune as workflow_prune

FAST = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]


def run_cli(*args):
    return prune.main([str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_tod(tiny_checkpoint, calib_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tod"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "none", *calib, *FAST) == 0
    return out


def test_output_folder_is_complete(pruned_tod):
    names = {p.name for p in pruned_tod.iterdir()}
    for required in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "fair_moe_plan.json", SCORES_FILE, "README.md", "allocation.png"):
        assert required in names
    assert not [p for p in pruned_tod.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_plan_budget_is_exact_and_every_layer_keeps_top_k(pruned_tod):
    plan = json.loads((pruned_tod / "fair_moe_plan.json").read_text())
    assert plan["removed_total"] == 3 * round(0.5 * 12)
    assert set(plan["kept_experts"]) == {"0", "1", "2"}
    for ids in plan["kept_experts"].values():
        assert ids == sorted(ids) and len(ids) >= 3
    assert plan["settings"]["allocation"] == "tod" and plan["alpha"] is not None
    assert sum(plan["kept_counts"].values()) == 36 - 18


def test_cli_output_equals_masked_original(pruned_tod, tiny_checkpoint):
    plan = PrunePlan.load(pruned_tod)
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_tod, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), masked_experts(original, plan.kept):
        reference = original(input_ids=ids).logits
    with torch.no_grad():
        assert (pruned(input_ids=ids).logits - reference).abs().max().item() < 1e-4


def test_scores_reproduce_the_plan_without_calibrating(pruned_tod, tiny_checkpoint, tmp_path, monkeypatch):
    def no_calibration(*a, **k):
        raise AssertionError("calibration must not run with --scores")

    monkeypatch.setattr(workflow_prune, "score", no_calibration)
    out = tmp_path / "again"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "none",
                   "--scores", pruned_tod / SCORES_FILE, "--quiet") == 0
    assert PrunePlan.load(out).kept == PrunePlan.load(pruned_tod).kept


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_other_allocations_from_scores(pruned_tod, tiny_checkpoint, tmp_path, allocation):
    out = tmp_path / allocation
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25", "--allocation", allocation,
                   "--scores", pruned_tod, "--quiet") == 0
    plan = PrunePlan.load(out)
    assert plan.removed_total == 3 * 3
    if allocation == "uniform":
        assert set(plan.kept_counts.values()) == {9}
        assert json.loads((out / "config.json").read_text())["num_experts"] == 9


def test_model_card_has_hub_metadata(pruned_tod):
    card = (pruned_tod / "README.md").read_text()
    assert card.startswith("---\n")
    assert "library_name: transformers" in card and "- fair-moe" in card
    assert "trust_remote_code=True" in card or "stock architecture" in card


def test_list_models(capsys):
    assert run_cli("--list-models") == 0
    assert "qwen2_moe" in capsys.readouterr().out.split()


def test_dry_run_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "dry"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25", "--dry-run") == 0
    assert "12 routed experts per layer" in capsys.readouterr().out
    assert not out.exists()


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense_qwen_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dense"), tiny_qwen2_moe_config(mlp_only_layers=[0, 1, 2]))


@pytest.fixture(scope="module")
def nan_scores(pruned_tod, tmp_path_factory):
    scores = Scores.load(pruned_tod)
    scores.removal["reap"][1, 2] = math.nan
    path = tmp_path_factory.mktemp("nan") / SCORES_FILE
    scores.save(path)
    return path


@pytest.fixture(scope="module")
def bad_calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_calib")
    (folder / "empty.txt").write_text("   \n")
    (folder / "short.txt").write_text("def f(x): return x")
    return folder


BAD_INPUTS = {
    "too aggressive": (["--budget", "0.9"], "top_k=3"),
    "budget zero": (["--budget", "0"], "between 0 and 1"),
    "budget one": (["--budget", "1"], "between 0 and 1"),
    "budget negative": (["--budget", "-0.2"], "between 0 and 1"),
    "rounds to nothing": (["--budget", "0.01"], "raise --budget"),
    "no budget": ([], "--budget"),
    "missing model": (["--budget", "0.25", "--model", "/nonexistent/model"], "does not exist"),
    "unsupported type": (["--budget", "0.25", "--model", "LLAMA"], "'llama' has no MoE layers fair_moe can prune"),
    "no moe layers": (["--budget", "0.25", "--model", "DENSE"], "no MoE layers"),
    "missing calib": (["--budget", "0.25", "--calib-file", "/nonexistent/calib.txt"], "does not exist"),
    "empty calib": (["--budget", "0.25", "--calib-file", "BAD/empty.txt"], "holds no text"),
    "short calib": (["--budget", "0.25", "--calib-file", "BAD/short.txt", "--calib-file", "BAD/short.txt"],
                    "fewer than --seq-len"),
    "nan scores": (["--budget", "0.25", "--scores", "NAN"], "NaN"),
    "missing scores": (["--budget", "0.25", "--scores", "/nonexistent/scores.safetensors"], "does not exist"),
    "wasserstein one class": (["--budget", "0.25", "--removal", "wasserstein", "--calib-file", "CALIB0"],
                              "two calibration classes"),
    "tolerance with uniform": (["--tolerance", "0.3", "--allocation", "uniform"], "--tolerance"),
    "tolerance with auto": (["--tolerance", "0.3"], "--tolerance"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, tiny_checkpoint, llama_checkpoint, dense_qwen_checkpoint, nan_scores, bad_calib,
                                 calib_files, tmp_path, capsys):
    args, expected = BAD_INPUTS[case]
    replace = {"LLAMA": llama_checkpoint, "DENSE": dense_qwen_checkpoint, "NAN": nan_scores, "CALIB0": calib_files[0]}
    args = [str(replace.get(a, a)).replace("BAD", str(bad_calib)) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_checkpoint)]
    out = tmp_path / "out"
    assert run_cli(*args, "--out", out, *FAST) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] != []
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_existing_out_is_refused_and_untouched(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25", *FAST) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_scores_of_another_model_are_refused(pruned_tod, tmp_path, capsys):
    other = write_checkpoint(tmp_path / "other", tiny_qwen2_moe_config(num_experts=16))
    assert run_cli("--model", other, "--out", tmp_path / "out", "--budget", "0.25", "--scores", pruned_tod,
                   "--quiet") == 2
    assert "another model" in capsys.readouterr().err


def test_several_budgets_from_one_scores_file(pruned_tod, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(workflow_prune, "score",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("no calibration")))
    out = tmp_path / "multi"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25,0.5", "--allocation", "tod",
                   "--compensate", "none", "--scores", pruned_tod, "--quiet") == 0
    assert sorted(p.name for p in out.iterdir()) == ["budget-0.25", "budget-0.5"]
    for budget, removed in (("0.25", 9), ("0.5", 18)):
        plan = PrunePlan.load(out / f"budget-{budget}")
        assert plan.removed_total == removed
        assert (out / f"budget-{budget}" / "model.safetensors").is_file()
    assert PrunePlan.load(out / "budget-0.5").kept == PrunePlan.load(pruned_tod).kept


def test_dry_run_on_a_bare_real_config(capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "fair_moe" / "data" / "configs" / "models" / "qwen1.5-moe-a2.7b.json"
    assert run_cli("--model", config, "--budget", "0.25", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "24 MoE layers" in out and "60 routed experts per layer" in out
    assert "360 experts removed" in out
    assert "14.316 B in all" in out  # Qwen1.5-MoE-A2.7B has 14.3 B parameters


def test_default_command_selects_and_compensates(tiny_checkpoint, calib_files, tmp_path):
    """The default is --allocation auto --compensate auto; its output still equals the masked original."""
    out = tmp_path / "default"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", *calib, *FAST) == 0
    plan = PrunePlan.load(out)
    assert plan.settings["allocation"] == "auto" and plan.removed_total == 18
    assert len(plan.settings["candidates"]) == 12
    assert all("kl_mean" in c and "gain_se" in c for c in plan.settings["candidates"])
    decision = plan.settings["compensation_decision"]
    assert [c["compensation"] for c in decision["candidates"]] == ["none", "layer-scale", "router-kd"]
    chosen = plan.settings["selected"]["compensation"]
    assert (plan.compensation.kind if plan.compensation else "none") == chosen
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), reference(original, plan):
        expected = original(input_ids=ids).logits
    with torch.no_grad():
        assert (pruned(input_ids=ids).logits - expected).abs().max().item() < 1e-4


def test_calib_dataset_from_a_local_folder(tiny_checkpoint, calib_files, tmp_path):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(calib_files[1], data / "train.jsonl")
    out = tmp_path / "from_dataset"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25", "--allocation", "uniform",
                   "--calib-dataset", data, *FAST) == 0
    assert PrunePlan.load(out).settings["calibration"]["sources"] == [str(data)]


def test_offloaded_run_gives_the_in_memory_plan(tiny_checkpoint, calib_files, tmp_path):
    """--device-map auto with a tiny --max-memory offloads every weight to disk; plan and output are unchanged."""
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    common = ["--model", tiny_checkpoint, "--budget", "0.5", "--allocation", "tod", "--compensate", "none",
              *calib, *FAST]
    assert run_cli(*common, "--out", tmp_path / "memory") == 0
    assert run_cli(*common, "--out", tmp_path / "offload", "--device-map", "auto", "--max-memory", "cpu=60KB",
                   "--offload-folder", tmp_path / "offload_weights") == 0
    assert PrunePlan.load(tmp_path / "offload").kept == PrunePlan.load(tmp_path / "memory").kept
    a = Scores.load(tmp_path / "memory")
    b = Scores.load(tmp_path / "offload")
    torch.testing.assert_close(a.protection, b.protection, rtol=1e-4, atol=1e-9)


def test_router_temperature_from_the_command_line(tiny_checkpoint, pruned_tod, tmp_path):
    out = tmp_path / "temperature"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "router-temperature", "--scores", pruned_tod, "--quiet") == 0  # verified on write
    plan = PrunePlan.load(out)
    assert plan.compensation.kind == "router-temperature" and set(plan.compensation.per_layer) == {0, 1, 2}


def test_merge_from_the_command_line(tiny_checkpoint, pruned_tod, tmp_path):
    out = tmp_path / "merge"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25,0.5", "--allocation", "tod",
                   "--compensate", "merge", "--scores", pruned_tod, "--quiet") == 0  # each budget verified on write
    for budget in ("0.25", "0.5"):
        plan = PrunePlan.load(out / f"budget-{budget}")
        assert plan.compensation.kind == "merge"


def test_router_kd_from_the_command_line(tiny_checkpoint, pruned_tod, tmp_path, capsys):
    out = tmp_path / "kd"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "router-kd", "--compensate-option", "steps=2", "--compensate-option", "eval_every=1",
                   "--scores", pruned_tod, "--quiet") == 0  # verified on write
    plan = PrunePlan.load(out)
    assert plan.compensation.kind == "router-kd" and plan.compensation.fit["options"]["steps"] == 2
    defaults = COMPENSATIONS.get("router-kd").parse_options(())
    assert plan.compensation.fit["options"] == {**defaults, "steps": 2, "eval_every": 1}
    assert (out / "fair_moe_compensation.safetensors").is_file()
    assert "router rows for the kept experts" in (out / "README.md").read_text()
    assert run_cli("--model", tiny_checkpoint, "--out", tmp_path / "bad", "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "router-kd", "--compensate-option", "stepz=2", "--scores", pruned_tod) == 2
    assert "stepz=2" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_router_kd_rows_are_recorded_as_a_half_precision_checkpoint_holds_them(calib_files, tmp_path):
    """A float16 source computed in float32: the plan records the learned router rows rounded to float16, the
    rows the checkpoint holds, so plan, reference and checkpoint agree exactly (with float32 rows in the plan a
    rounded row moved a near-tie top-k choice of a real run, and its verification failed)."""
    from safetensors.torch import load_file

    source = tmp_path / "half"
    config, tokenizer = tiny_qwen2_moe_config(), train_tiny_tokenizer()
    config.vocab_size = len(tokenizer)
    build_model(config).half().save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "kd"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert run_cli("--model", source, "--out", out, "--budget", "0.5", "--allocation", "uniform", "--removal", "ean",
                   "--compensate", "router-kd", "--compensate-option", "steps=2", *calib, *FAST) == 0
    plan, written = PrunePlan.load(out), load_file(out / "model.safetensors")
    assert set(plan.compensation.per_layer) == {0, 1, 2}
    for layer, entry in plan.compensation.per_layer.items():
        router = written[f"model.layers.{layer}.mlp.gate.weight"]
        assert router.dtype == torch.float16 and entry["kept"] == sorted(entry["kept"])
        assert torch.equal(entry["weight"].float(), router.float())


def test_a_budget_on_a_half_rounds_up(tiny_checkpoint, pruned_tod, tmp_path):
    """0.375 × 12 experts = 4.5 per layer → 5 (Python's round would give 4)."""
    out = tmp_path / "half"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.375", "--allocation", "uniform",
                   "--compensate", "none", "--scores", pruned_tod, "--quiet") == 0
    assert PrunePlan.load(out).removed_total == 3 * 5


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("allocation", ["uniform", "tod"])
def test_output_config_is_the_source_config_patched(tiny_checkpoint, calib_files, tmp_path, stream, allocation):
    """Every field of the source's config.json survives as written (transformers-4-era readers need rope_theta);
    only the count changes, plus the per-layer fields and auto_map / architectures of an uneven plan. The base
    model's own notes are not copied; its tokenizer and licence are."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source)
    config = json.loads((source / "config.json").read_text())
    config.update(rope_theta=1000000.0, some_future_field={"kept": [1, 2]})
    (source / "config.json").write_text(json.dumps(config))
    for name in ("TRAINING.md", "training_metrics.json", "LICENSE"):
        (source / name).write_text(name)
    out = tmp_path / "out"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert run_cli("--model", source, "--out", out, "--budget", "0.5", "--allocation", allocation, "--compensate",
                   "none", *calib, *FAST, *([] if stream else ["--no-stream"])) == 0
    written = json.loads((out / "config.json").read_text())
    plan = PrunePlan.load(out)
    changed = {k for k in set(written) | set(config) if written.get(k) != config.get(k)}
    expected = {"num_experts"} | ({"fair_moe_experts_per_layer", "fair_moe_layout", "auto_map", "architectures"}
                                  if not plan.is_uniform else set())
    assert changed == expected
    assert written["num_experts"] == max(plan.kept_counts.values())
    assert written["rope_theta"] == 1000000.0 and written["some_future_field"] == {"kept": [1, 2]}
    if not plan.is_uniform:
        assert written["architectures"] == ["FairMoeForCausalLM"]
    names = {p.name for p in out.iterdir()}
    assert "LICENSE" in names and "tokenizer.json" in names
    assert not names & {"TRAINING.md", "training_metrics.json"}


def test_layout_stock_gives_the_stock_class(tiny_checkpoint, calib_files, tmp_path, capsys):
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    out = tmp_path / "stock"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", "--layout", "stock", *calib,
                   *FAST) == 0  # auto, judged among plans with one count per layer only
    plan = PrunePlan.load(out)
    assert plan.is_uniform and {c["allocation"] for c in plan.settings["candidates"]} == {"uniform"}
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen2MoeForCausalLM"
    assert run_cli("--model", tiny_checkpoint, "--out", tmp_path / "no", "--budget", "0.5", "--layout", "stock",
                   "--allocation", "tod", *calib, *FAST) == 2
    assert "--layout stock" in capsys.readouterr().err


def test_an_uneven_plan_says_how_to_load_it(pruned_tod, capsys, tiny_checkpoint, tmp_path):
    assert run_cli("--model", tiny_checkpoint, "--out", tmp_path / "o", "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "none", "--scores", pruned_tod) == 0
    out = capsys.readouterr().out
    assert "time: load" in out and "verify" in out  # the time each phase took
    if not PrunePlan.load(tmp_path / "o").is_uniform:
        assert "trust_remote_code=True" in out and "--layout stock" in out


def test_a_hub_id_is_streamed_from_its_snapshot(tiny_checkpoint, pruned_tod, tmp_path, monkeypatch):
    """--model org/name resolves through the Hub cache (offline here) and is streamed like a local folder, with
    --device-map too; the card names it as base_model and inherits its licence."""
    import shutil

    import huggingface_hub.constants as hub_constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-moe"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / revision)
    (repo / "snapshots" / revision / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert run_cli("--model", "org/tiny-moe", "--out", out, "--budget", "0.5", "--allocation", "uniform",
                   "--compensate", "none", "--scores", pruned_tod, "--device-map", "auto", "--quiet") == 0
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["base_model"] == "org/tiny-moe" and card["license"] == "apache-2.0"
    assert PrunePlan.load(out).base_model == "org/tiny-moe"
    assert run_cli("--model", "org/not-cached", "--out", tmp_path / "none", "--budget", "0.5", "--quiet") == 2


def test_no_calibration_data_for_a_model_that_is_not_the_demo(tiny_checkpoint, tmp_path, capsys):
    assert run_cli("--model", tiny_checkpoint, "--out", tmp_path / "o", "--budget", "0.25", *FAST) == 2
    err = capsys.readouterr().err
    assert "--calib-file" in err and "--calib-dataset" in err and not (tmp_path / "o").exists()


def test_a_composite_dataset_mix_from_the_command_line(tiny_checkpoint, calib_files, tmp_path):
    data = [x for f in calib_files for x in ("--calib-dataset", f"json,data_files={f},samples=3")
            if f.suffix == ".jsonl"]
    out = tmp_path / "mix"
    code = calib_files[0]
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in code.read_text().split("\n\n")))
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.25", "--allocation", "uniform",
                   "--compensate", "none", *data, "--calib-dataset", f"json,data_files={tmp_path / 'code.jsonl'}",
                   *FAST) == 0
    calibration = PrunePlan.load(out).settings["calibration"]
    assert calibration["sources"] == ["json:legal.jsonl", "json:code.jsonl"] and calibration["samples"] == 4


def test_quiet_prints_only_the_final_path(tiny_checkpoint, pruned_tod, tmp_path, capsys):
    out = tmp_path / "q"
    assert run_cli("--model", tiny_checkpoint, "--out", out, "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "none", "--scores", pruned_tod, "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {out}"
    assert captured.err.strip() == ""  # no progress bars, no loading notices


def test_a_recipe_reproduces_a_run_and_flags_override_it(tiny_checkpoint, calib_files, tmp_path):
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    first = tmp_path / "first"
    assert run_cli("--model", tiny_checkpoint, "--out", first, "--budget", "0.5", "--allocation", "tod",
                   "--compensate", "none", *calib, *FAST) == 0
    recipe = first / "fair_moe_recipe.yaml"
    import yaml

    data = yaml.safe_load(recipe.read_text())
    assert data["allocation"] == "tod" and data["budget"] == "0.5" and data["samples"] == 4
    assert "quiet" not in data and "overwrite" not in data
    again = tmp_path / "again"
    assert run_cli("--recipe", recipe, "--out", again, "--quiet") == 0
    assert PrunePlan.load(again).kept == PrunePlan.load(first).kept  # same seed, same plan
    other = tmp_path / "other"
    assert run_cli("--recipe", recipe, "--out", other, "--allocation", "uniform", "--quiet") == 0
    assert PrunePlan.load(other).settings["allocation"] == "uniform"  # the flag wins over the recipe


def test_a_bad_recipe_key_is_refused(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("budgett: 0.5\n")
    assert run_cli("--recipe", tmp_path / "r.yaml") == 2
    assert "'budgett' is not a setting" in capsys.readouterr().err


def test_a_saved_plan_is_applied_without_calibrating(tiny_checkpoint, pruned_tod, tmp_path, monkeypatch):
    from fair_moe.core.plan import CompensationRecord

    def no_calibration(*a, **k):
        raise AssertionError("--plan must not calibrate")

    monkeypatch.setattr(workflow_prune, "score", no_calibration)
    plan = PrunePlan.load(pruned_tod)
    plan.compensation = CompensationRecord("layer-scale", {i: 0.9 for i in plan.kept})
    plan.save(tmp_path)
    out = tmp_path / "applied"
    assert run_cli("--model", tiny_checkpoint, "--plan", tmp_path / "fair_moe_plan.json", "--out", out,
                   "--quiet") == 0  # verified against the masked original with the recorded scales
    applied = PrunePlan.load(out)
    assert applied.kept == plan.kept and applied.compensation.per_layer == {i: 0.9 for i in plan.kept}
    other = tmp_path / "other"
    small = write_checkpoint(tmp_path / "small", tiny_qwen2_moe_config(num_experts=8))
    assert run_cli("--model", small, "--plan", tmp_path / "fair_moe_plan.json", "--out", other, "--quiet") == 2


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "glm4v_moe"])
def test_multimodal_checkpoint_keeps_its_other_towers(name, calib_files, tmp_path):
    """The language tower's experts are pruned through the command (calibrated on text); the checkpoint keeps the
    vision tower and its config, loads with the model's own Auto class as the stock class, and equals the masked
    original."""
    import transformers
    from zoo import auto_class, zoo_config

    source = write_checkpoint(tmp_path / "src", zoo_config(name))
    out = tmp_path / "out"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert run_cli("--model", source, "--out", out, "--budget", "0.25", "--allocation", "uniform", "--compensate",
                   "none", *calib, *FAST) == 0
    auto = auto_class(name)
    assert json.loads((out / "config.json").read_text())["vision_config"] == \
        json.loads((source / "config.json").read_text())["vision_config"]
    original = auto.from_pretrained(source, dtype=torch.float32).eval()
    pruned = auto.from_pretrained(out, dtype=torch.float32).eval()
    assert type(pruned) is type(original) and auto is not transformers.AutoModelForCausalLM
    vision = [k for k in original.state_dict() if "visual" in k or "vision" in k]
    assert vision and all(torch.equal(original.state_dict()[k], pruned.state_dict()[k]) for k in vision)
    plan = PrunePlan.load(out)
    ids = torch.randint(1, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), masked_experts(original, plan.kept):
        expected = original(input_ids=ids).logits
    with torch.no_grad():
        assert (pruned(input_ids=ids).logits - expected).abs().max().item() < 1e-4


def test_threads_sets_torchs_cpu_threads_and_stays_out_of_the_recipe(tiny_checkpoint, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert run_cli("--model", tiny_checkpoint, "--out", tmp_path / "dry", "--budget", "0.25", "--dry-run",
                       "--threads", "3") == 0
        assert torch.get_num_threads() == 3 != before
    finally:
        torch.set_num_threads(before)
    args = cli_prune.parse_args(["--model", str(tiny_checkpoint), "--budget", "0.25", "--threads", "1"])
    assert "threads" not in cli_prune.recipe_of(args)
    assert run_cli("--model", tiny_checkpoint, "--out", tmp_path / "bad", "--budget", "0.25", "--dry-run",
                   "--threads", "0") == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

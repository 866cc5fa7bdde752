"""fair_moe.eval through lm-eval's real Python API on the offline task, plus perplexity and recovery."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fair_moe import prune_model, save_pruned
from fair_moe.calibration import BUNDLED_HELDOUT_DIR, DEMO_MODEL_DIR
from fair_moe.calibration.text import bundled_sources
from fair_moe.eval import main as eval_main
from fair_moe.workflow.evaluate import recovery

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def pruned_demo(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    pruned, plan = prune_model(model, tokenizer, bundled_sources(), budget=0.5, samples=6, seq_len=128,
                               progress=False)
    out = tmp_path_factory.mktemp("pruned_demo")
    save_pruned(pruned, out, tokenizer, plan)
    return out


def test_recovery_is_pruned_over_base_and_inverted_for_perplexity():
    table = recovery({"t/acc": 0.4, "perplexity/a": 20.0}, {"t/acc": 0.5, "perplexity/a": 10.0})
    assert table == {"t/acc": pytest.approx(0.8), "perplexity/a": pytest.approx(0.5), "average": pytest.approx(0.65)}


def test_eval_with_base_writes_metrics_and_recovery(pruned_demo, tmp_path):
    out = tmp_path / "results.json"
    rc = eval_main(["--model", str(pruned_demo), "--base", str(DEMO_MODEL_DIR), "--tasks", "fair_moe_heldout_mc",
                    "--limit", "6",
                    "--ppl-file", str(BUNDLED_HELDOUT_DIR / "docs.txt"), "--ppl-seq-len", "256",
                    "--output-json", str(out), "--trust-remote-code", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    result = json.loads(out.read_text())
    for metrics in (result["metrics"], result["base_metrics"]):
        assert 0.0 <= metrics["fair_moe_heldout_mc/acc"] <= 1.0
        assert "perplexity/overall" not in metrics  # one file: no second copy of the same number
        assert metrics["perplexity/docs"] > 1.0
    assert result["metrics"]["perplexity/docs"] > result["base_metrics"]["perplexity/docs"]  # pruning half hurts
    rec = result["recovery"]
    assert rec["perplexity/docs"] == pytest.approx(
        result["base_metrics"]["perplexity/docs"] / result["metrics"]["perplexity/docs"])
    assert "| perplexity/docs |" in out.with_suffix(".md").read_text()
    harness = json.loads(out.with_name("results.lm_eval.model.json").read_text())  # lm-eval's own results, kept
    assert "fair_moe_heldout_mc" in harness["results"]
    assert result["base_from_cache"] is False
    # Again against the same base: its results come from the cache; a threshold it misses exits 1.
    again = tmp_path / "again.json"
    rc = eval_main(["--model", str(pruned_demo), "--base", str(DEMO_MODEL_DIR), "--tasks", "fair_moe_heldout_mc",
                    "--limit", "6",
                    "--ppl-file", str(BUNDLED_HELDOUT_DIR / "docs.txt"), "--ppl-seq-len", "256",
                    "--output-json", str(again), "--trust-remote-code", "--cache-dir", str(tmp_path / "cache"),
                    "--fail-under", "1.5"])
    assert rc == 1
    second = json.loads(again.read_text())
    assert second["base_from_cache"] is True and second["base_metrics"] == result["base_metrics"]


def test_quiet_leaves_the_results_and_no_progress_bars(pruned_demo, tmp_path, capfd):
    rc = eval_main(["--model", str(pruned_demo), "--ppl-file", str(BUNDLED_HELDOUT_DIR / "docs.txt"),
                    "--ppl-seq-len", "256", "--output-json", str(tmp_path / "r.json"), "--trust-remote-code",
                    "--no-cache", "--quiet"])
    out, err = capfd.readouterr()
    assert rc == 0 and "perplexity/docs:" in out
    assert "Loading weights" not in err and "it/s" not in err  # transformers' loading bar, any tqdm bar


def test_an_uneven_checkpoint_needs_the_trust_flag(pruned_demo, tmp_path, capsys):
    config = json.loads((pruned_demo / "config.json").read_text())
    if not config.get("auto_map"):
        pytest.skip("the demo plan came out even")
    assert eval_main(["--model", str(pruned_demo), "--ppl-file", str(BUNDLED_HELDOUT_DIR / "docs.txt"),
                      "--output-json", str(tmp_path / "r.json")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def test_unknown_task_and_missing_file_fail_cleanly(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert eval_main(["--model", str(DEMO_MODEL_DIR), "--tasks", "no_such_task_xyz", "--output-json", str(out)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert eval_main(["--model", str(DEMO_MODEL_DIR), "--ppl-file", "/nonexistent.txt", "--output-json", str(out)]) == 2
    assert "--ppl-file not found" in capsys.readouterr().err
    assert not out.exists()

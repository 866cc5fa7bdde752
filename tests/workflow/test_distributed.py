"""Data-parallel calibration: shares merged on rank 0 equal one pass; torchrun with gloo gives the same scores and
plan as one process; a failing rank takes the group down with one line each and nothing written."""

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from conftest import CharTokenizer, build_model, tiny_qwen2_moe_config

from fair_moe.adapters import get_adapter
from fair_moe.calibration.text import CalibrationSource, make_batches
from fair_moe.core.plan import PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.core.statistics import SignalStatistics
from fair_moe.strategies.signals import compute_signals
from fair_moe.units.experts.calibrate import run_calibration
from fair_moe.workflow.distributed import Ranks

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = ["--model", "demo", "--budget", "0.25", "--allocation", "uniform", "--compensate", "none", "--samples", "8",
        "--seq-len", "128", "--quiet"]


def test_shares_merged_equal_one_pass():
    rng = random.Random(4)
    sources = [CalibrationSource(n, ["".join(rng.choice(c) for _ in range(3000))]) for n, c in
               (("a", "abcdef "), ("b", "uvwxyz01 "))]
    batches = make_batches(CharTokenizer(), sources, samples=8, seq_len=24, batch_size=2, seed=0)
    model = build_model(tiny_qwen2_moe_config(), seed=1)
    layers = get_adapter(model.config).moe_layers(model)
    whole = run_calibration(model, layers, batches, 2, seed=0, progress=False)
    parts = [run_calibration(model, layers, Ranks(r, 3).share(batches), 2, seed=0, progress=False) for r in range(3)]
    merged = SignalStatistics.merge(parts)
    assert merged.tokens == whole.tokens and torch.equal(merged.count, whole.count)
    (a_removal, a_protection), (b_removal, b_protection) = compute_signals(whole), compute_signals(merged)
    assert a_removal.keys() == b_removal.keys()
    for name in a_removal:
        torch.testing.assert_close(a_removal[name], b_removal[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a_protection, b_protection, rtol=1e-9, atol=1e-12)


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def test_two_gloo_ranks_give_the_one_process_scores_and_plan(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "fair_moe.prune", *ARGS, "--out", str(one)], check=True, env=_env(),
                   cwd=ROOT, capture_output=True)
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "-m", "fair_moe.prune", *ARGS, "--out", str(two)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"wrote {two}"  # rank 0 alone writes
    a, b = Scores.load(one), Scores.load(two)
    assert a.meta["calibration"] == b.meta["calibration"]
    for name in a.removal:
        torch.testing.assert_close(a.removal[name], b.removal[name], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.protection, b.protection, rtol=1e-9, atol=1e-12)
    assert PrunePlan.load(one).kept == PrunePlan.load(two).kept


def test_a_failing_rank_stops_the_group_and_nothing_is_written(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    # rank 1 breaks during calibration; rank 0 is left waiting for its share
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import fair_moe.units.experts.calibrate as c\n"
        "    def broken(*a, **k):\n"
        "        raise RuntimeError('calibration batch could not be read')\n"
        "    c.run_calibration = broken\n")
    out = tmp_path / "out"
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "-m", "fair_moe.prune", *ARGS, "--out", str(out)],
                          env=_env(PYTHONPATH=str(hooks)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert sorted(line[:20] for line in errors) == ["error: rank 0 of 2: ", "error: rank 1 of 2: "], errors
    assert any(line.startswith("error: rank 1 of 2: RuntimeError: calibration batch") for line in errors), errors
    assert 'File "' + str(ROOT / "fair_moe") not in done.stderr  # no traceback of ours (torchrun prints its own)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hooks"]

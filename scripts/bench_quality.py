"""The quality battery: held-out perplexity of every fixed method, the paper's rule, the default and router KD,
on several fixtures × two calibration regimes × five budgets.

    python scripts/train_demo_model.py --fixture olmoe   # fixtures besides the demo (17-70 min each, at the
                                                         # thread count each preset pins)
    python scripts/train_demo_model.py --fixture mixtral
    python scripts/train_demo_model.py --fixture deepseek
    python scripts/train_demo_model.py --fixture qwen3
    python scripts/train_demo_model.py --fixture qwen2moe6
    python scripts/train_demo_model.py --fixture olmoe16
    python scripts/bench_quality.py --out bench_out/battery                  # everything (hours on 2 cores)
    python scripts/bench_quality.py --fixtures demo --regimes sources --budgets 0.25,0.5 --out bench_out/dev
    python scripts/bench_quality.py --fixtures demo --only-default --out bench_out/dev_rule2   # the default only
    python scripts/bench_quality.py --out bench_out/all --merge bench_out/b1 bench_out/b2 --defaults bench_out/d

Fixtures: ``demo`` (the shipped qwen2_moe, 32 experts top-4 + a shared expert), ``olmoe`` (32 experts top-4, no
shared expert), ``mixtral`` (8 experts top-2, renormalised), ``deepseek`` (32 experts top-4, sigmoid + selection
bias, shared expert), ``qwen3`` (16 experts top-2, renormalised, no shared expert), ``qwen2moe6`` (6 layers, 30
experts top-4, shared expert), ``olmoe16`` (5 layers, 16 experts top-4, no shared expert), ``deepseek_grouped``
(as deepseek, with group-limited routing: 4 groups of 8, the best 2; not in the default list: first run on
2026-12-01 as an unseen check, benchmarks/battery/check_deepseek_grouped_*), ``qwen3_24`` (5 layers, 24 experts
top-4, renormalised, no shared expert; not in the default list: first run on 2026-12-02 as the unseen check of that
day's rule change, benchmarks/battery/check_qwen3_24_*), ``olmoe64`` (4 layers, 64 experts of width 48, top-8,
softmax without renormalisation, no shared expert: fine-grained routing; not in the default list: first run later on
2026-12-02 with the shipped rule as a check, benchmarks/battery/check_olmoe64_*). Regimes: ``sources``
calibrates on one file per text domain (three classes); ``mixed`` on one file holding every document of the three,
shuffled (one class: the "a C4 sample" situation, where the wasserstein signal is not available). Every model is
evaluated through the exact masked forward (removed experts' router logits at -inf, the compensation applied), which
the test suite proves equal to the written checkpoint, on held-out documents that neither training nor calibration
saw (non-overlapping 512-token windows, all domains).

Each full cell also records what auto judges by, so that a change of its rule can be replayed offline over every
recorded cell (``scripts/bench_replay_rule.py``) before any rerun: ``judge`` holds every fixed configuration's
per-window KL(dense ‖ pruned) on all judging windows (both looks, in order; ``first_look`` of them are the first)
and ``default_selection`` what the default's own run measured on its candidates.

Per cell: dense; every allocation (uniform, global, tod) × removal signal (reap, frequency, ean, wasserstein when
available, consensus), without compensation and with the layer scale; the paper's rule (tod + wasserstein +
Taylor, no compensation; tod + ean where there is one class); the default command (no method flags); and router
KD on the plan uniform+ean. The best baseline is the best uniform or global allocation with reap, frequency, ean
or wasserstein, uncompensated (consensus, ours, counts among the fixed configurations only). Results are appended
to OUT/cells.jsonl as they come (a rerun skips finished cells); OUT/battery.md is the summary table, with the
worst case and the mean at 0.5 of default ÷ best baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_moe.calibration.text import sources_from_files, token_stream  # noqa: E402
from fair_moe.core.budget import Budget  # noqa: E402
from fair_moe.metrics import DenseReference, stream_nll  # noqa: E402
from fair_moe.strategies import COMPENSATIONS  # noqa: E402
from fair_moe.strategies.compensations import FitData  # noqa: E402
from fair_moe.strategies.planning import make_plan  # noqa: E402
from fair_moe.strategies.selection import (  # noqa: E402
    CLEAR,
    decide_compensation,
    judging_windows,
    reference,
    select_plan,
    window_kl,
)
from fair_moe.units import UNIT_KINDS  # noqa: E402
from fair_moe.workflow.scoring import score  # noqa: E402

EXPERTS = UNIT_KINDS.get("experts")
FIXTURES = {
    "demo": (ROOT / "fair_moe" / "data" / "demo_model", ROOT / "fair_moe" / "data"),
    **{name: (ROOT / "bench_out" / "fixtures" / name / "model", ROOT / "bench_out" / "fixtures" / name)
       for name in ("olmoe", "mixtral", "deepseek", "qwen3", "qwen2moe6", "olmoe16", "deepseek_grouped", "qwen3_24",
                     "olmoe64")},
}
ALLOCATIONS = ("uniform", "global", "tod")
SIGNALS = ("reap", "frequency", "ean", "wasserstein", "consensus")
BASELINE_ALLOCATIONS = ("uniform", "global")
# a baseline is a plain allocation with a published signal; consensus (ours, built from these) counts as fixed only
BASELINE_SIGNALS = ("reap", "frequency", "ean", "wasserstein")
# Which cells the defaults were developed on (their results were seen while choosing them); every other cell only
# checks them. mixtral joined on 2026-11-30: its first cells showed the heavy-tailed window KLs that the sign test
# of auto's rule answers. deepseek joined later that day: its loss at 0.5 (an undecided rival at 1.9 standard
# errors) is what the second judging look answers. The qwen3 fixture (trained after that rule was fixed and run
# once) and the olmoe fixture (never run before; trained after router KD's step was fixed at 4 pieces, run once)
# only check the current rule, and so does qwen2moe6 (issue 10's new-user shape, trained and run once on 2026-11-30
# after the last change of the rule and of router KD), and olmoe16 (trained and run once on 2026-12-01, after the
# consensus signal was added as an opt-in signal, not an auto candidate). deepseek_grouped (trained 2026-11-30, first
# run 2026-12-01) checked a rule change that was then not adopted; it has been seen once, by that check.
DEVELOPMENT_CELLS = {(fixture, regime) for fixture in ("demo", "mixtral", "deepseek")
                     for regime in ("sources", "mixed")}


def heldout_perplexity(model, streams: dict[str, torch.Tensor], seq_len: int = 512) -> float:
    """Perplexity over every held-out domain together (non-overlapping windows of ``seq_len`` tokens)."""
    nll = n = 0
    for ids in streams.values():
        a, b = stream_nll(model, ids, seq_len, stride=seq_len)
        nll, n = nll + a, n + b
    return math.exp(nll / n)


def mixed_file(calib_dir: Path, out: Path, seed: int = 0) -> Path:
    """Every calibration document of every domain in one file, shuffled (documents are split on blank lines)."""
    docs = [d for f in sorted(calib_dir.glob("*.txt")) for d in f.read_text().split("\n\n") if d.strip()]
    random.Random(seed).shuffle(docs)
    out.write_text("\n\n".join(docs))
    return out


def evaluate(model, plan, streams) -> float:
    with reference(model, EXPERTS, plan.kept, plan.compensation):
        return heldout_perplexity(model, streams)


def default_plan(model, scores, budget: float):
    """The default command's plan and compensation at one budget, and its name (allocation+signal[+compensation])."""
    selection = select_plan(model, EXPERTS, scores, Budget(budget), "auto", progress=False)
    plan = decide_compensation(model, EXPERTS, selection.plan, scores, "auto", 4, judge=selection.judge)
    chosen = plan.settings["selected"]
    return plan, (f"{chosen['allocation']}+{chosen['removal']}"
                  + (f"+{plan.compensation.kind}" if plan.compensation else ""))


def run_default(model, scores, streams, budget: float) -> dict:
    """The default command's plan and compensation at one budget, its held-out perplexity, and what auto measured
    on its candidates (``default_selection``: per candidate plan the judged windows, mean KL, paired gain and its
    standard error, wins, losses, screened out; per compensation the same)."""
    start = time.perf_counter()
    plan, method = default_plan(model, scores, budget)
    seconds = time.perf_counter() - start
    keep = ("windows", "kl_mean", "gain_vs_default", "gain_se", "wins", "losses", "screened_out")
    candidates = {f"{row['allocation']}+{row['removal']}": {k: row[k] for k in keep if k in row}
                  for row in plan.settings.get("candidates", [])}
    decision = plan.settings.get("compensation_decision", {})
    compensations = {row["compensation"]: {k: row[k] for k in keep if k in row}
                     for row in decision.get("candidates", [])}
    return {"default_seconds": seconds, "default": evaluate(model, plan, streams), "default_method": method,
            "default_rule": CLEAR, "default_selection": {"plans": candidates, "compensations": compensations}}


def judge_kl(model, judge, plan) -> list[float]:
    """Per judging window, KL(dense ‖ pruned) of ``plan`` (its compensation applied): what auto judges by."""
    return window_kl(judge, model, EXPERTS, plan.kept, plan.compensation).tolist()


def load_fixture(fixture: str):
    """The fixture's tokenizer, its model (float32, eval) and its held-out token streams {domain: ids [n]}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data_dir = FIXTURES[fixture]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    streams = {f.stem: token_stream(tokenizer, [f.read_text()]) for f in sorted((data_dir / "heldout").glob("*.txt"))}
    return tokenizer, model, streams


def regime_scores(model, tokenizer, fixture: str, regime: str, out: Path, samples: int, seq_len: int, seed: int):
    """The fixture's scores under one calibration regime: ``sources`` (one file per domain) or ``mixed`` (every
    document in one shuffled file, written to ``out``), ``samples`` windows of ``seq_len`` tokens and the judging
    windows auto needs."""
    from fair_moe.calibration.text import text_batches
    from fair_moe.workflow.scoring import selection_windows

    calib = FIXTURES[fixture][1] / "calib"
    files = sorted(calib.glob("*.txt")) if regime == "sources" else \
        [mixed_file(calib, out / f"{fixture}_mixed.txt", seed)]
    data = text_batches(tokenizer, sources_from_files(files), samples, seq_len, 8, seed,
                        selection_windows(samples), selection_windows(samples))
    return score(model, EXPERTS, data, seed, progress=False)


def run_cell(model, tokenizer, scores, streams, budget: float, dense: float, only_default: bool = False) -> dict:
    """Every method at one budget; {"method": perplexity} plus what the default chose."""
    target = Budget(budget)
    fit_ids = scores.calibration_subset(64)
    result: dict = {"dense": dense}
    if only_default:
        return {**result, **run_default(model, scores, streams, budget)}
    ids = judging_windows(scores)
    judge = DenseReference(model, ids, 4)
    kls: dict[str, list[float]] = {}
    result["judge"] = {"windows": len(ids), "first_look": scores.meta.get("calibration", {}).get("first_look"),
                       "kl": kls}
    for allocation in ALLOCATIONS:
        for signal in SIGNALS:
            if signal not in scores.removal:
                continue
            plan = make_plan(scores, target, allocation, signal)
            result[f"{allocation}+{signal}"] = evaluate(model, plan, streams)
            kls[f"{allocation}+{signal}"] = judge_kl(model, judge, plan)
            plan.compensation = COMPENSATIONS.get("layer-scale").fit(model, plan.kept, FitData(fit_ids))
            result[f"{allocation}+{signal}+layer-scale"] = evaluate(model, plan, streams)
            kls[f"{allocation}+{signal}+layer-scale"] = judge_kl(model, judge, plan)
    paper_signal = "wasserstein" if "wasserstein" in scores.removal else "ean"
    result["paper"] = result[f"tod+{paper_signal}"]
    result["paper_method"] = f"tod+{paper_signal}"
    result.update(run_default(model, scores, streams, budget))
    kd_plan = make_plan(scores, target, "uniform", "ean")
    kd_plan.compensation = COMPENSATIONS.get("router-kd").fit(model, kd_plan.kept, FitData(fit_ids))
    result["uniform+ean+router-kd"] = evaluate(model, kd_plan, streams)
    kls["uniform+ean+router-kd"] = judge_kl(model, judge, kd_plan)
    baselines = {name: result[name] for name in (f"{a}+{s}" for a in BASELINE_ALLOCATIONS for s in BASELINE_SIGNALS)
                 if name in result}
    fixed = {k: v for k, v in result.items() if isinstance(v, float) and k.split("+")[0] in ALLOCATIONS}
    result["best_baseline_method"] = min(baselines, key=baselines.get)
    result["best_baseline"] = baselines[result["best_baseline_method"]]
    result["best_fixed_method"] = min(fixed, key=fixed.get)
    result["best_fixed"] = fixed[result["best_fixed_method"]]
    return result


def default_ratio(cell: dict) -> float:
    """The cell's default ÷ its best baseline (held-out perplexities)."""
    return cell["default"] / cell["best_baseline"]


def percent_apart(ratio: float) -> str:
    """A mean default ÷ best baseline ratio in words, e.g. 0.93 → "a 7.0 % lower perplexity than the best baseline"."""
    side = "lower" if ratio <= 1 else "higher"
    return f"a {100 * abs(1 - ratio):.1f} % {side} perplexity than the best baseline"


def ratio_line(label: str, cells: list[dict], development: set[tuple[str, str]] = DEVELOPMENT_CELLS) -> str:
    """Worst and mean default ÷ best baseline over ``cells``, and the mean at budget 0.5 (those of them not used for
    development, ``development``'s (fixture, regime) pairs, in brackets)."""
    ratios = [default_ratio(c) for c in cells]
    line = f"{label}: {len(cells)} cells, worst {max(ratios):.3f}, mean {sum(ratios) / len(ratios):.3f}"
    half = [default_ratio(c) for c in cells if c["budget"] == 0.5]
    if half:
        line += f", at 0.5 mean {sum(half) / len(half):.3f}"
    unseen = [default_ratio(c) for c in cells if (c["fixture"], c["regime"]) not in development]
    if unseen:
        line += f" (not used for development: {len(unseen)} cells, worst {max(unseen):.3f}, mean " \
                f"{sum(unseen) / len(unseen):.3f})"
    return line


def summary(cells: list[dict], development: set[tuple[str, str]] = DEVELOPMENT_CELLS) -> str:
    """The battery table of ``cells`` and its summary lines; cells of ``development``'s (fixture, regime) pairs are
    marked (dev) and counted apart."""
    lines = ["| fixture | regime | budget | dense | best baseline | paper | default | router-kd (uniform+ean) | "
             "default ÷ best baseline | best fixed (incl. compensated) | default ÷ best fixed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        dev = " (dev)" if (c["fixture"], c["regime"]) in development else ""
        dev += "" if c.get("default_rule") == CLEAR else " †"
        lines.append(
            f"| {c['fixture']}{dev} | {c['regime']} | {c['budget']} | {c['dense']:.2f} | "
            f"{c['best_baseline']:.2f} ({c['best_baseline_method']}) | {c['paper']:.2f} ({c['paper_method']}) | "
            f"**{c['default']:.2f}** ({c['default_method']}) | {c['uniform+ean+router-kd']:.2f} | "
            f"{default_ratio(c):.3f} | {c['best_fixed']:.2f} ({c['best_fixed_method']}) | "
            f"{c['default'] / c['best_fixed']:.3f} |")
    ratios = [default_ratio(c) for c in cells]
    held_out = [default_ratio(c) for c in cells if (c["fixture"], c["regime"]) not in development]
    at_half = [default_ratio(c) for c in cells if c["budget"] == 0.5]
    held_out_half = [default_ratio(c) for c in cells
                     if c["budget"] == 0.5 and (c["fixture"], c["regime"]) not in development]
    lines += [
        "",
        f"cells: {len(cells)}; worst default ÷ best baseline: {max(ratios):.3f} "
        f"(mean {sum(ratios) / len(ratios):.3f}); "
        + (f"on cells not used for development: worst {max(held_out):.3f}, mean {sum(held_out) / len(held_out):.3f}; "
           if held_out else "")
        + (f"at budget 0.5: mean {sum(at_half) / len(at_half):.3f} ({percent_apart(sum(at_half) / len(at_half))})"
           if at_half else "")
        + (f"; at 0.5 on cells not used for development: mean {sum(held_out_half) / len(held_out_half):.3f}"
           if held_out_half else ""),
        f"default above the best baseline (ratio > 1.0005, i.e. 1.001 or more as printed): "
        f"{sum(r > 1.0005 for r in ratios)} of {len(ratios)} cells",
        f"worst default ÷ best fixed configuration (compensated ones included): "
        f"{max(c['default'] / c['best_fixed'] for c in cells):.3f}",
    ]
    current = [c for c in cells if c.get("default_rule") == CLEAR]
    if current and len(current) < len(cells):
        lines.append(ratio_line("on the cells whose default is the current rule's (no †)", current, development))
    if any(c.get("default_rule") != CLEAR for c in cells):
        lines.append("† the default was chosen by an earlier rule of auto than the current one (cells without a "
                     "recorded `default_rule` predate 2026-12-02: sign test with a mean gain above −1 standard error)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default="demo,olmoe,mixtral,deepseek,qwen3,qwen2moe6,olmoe16")
    p.add_argument("--regimes", default="sources,mixed")
    p.add_argument("--budgets", default="0.125,0.25,0.375,0.5,0.625")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only-default", action="store_true",
                   help="run only the default command per cell (e.g. after a change of auto's rule)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="only summarise: the cells.jsonl of these earlier --out folders into OUT/battery.md")
    p.add_argument("--defaults", type=Path, nargs="*", default=[], metavar="DIR",
                   help="with --merge: --only-default runs whose default replaces the merged cells' own")
    p.add_argument("--development", nargs="*", default=[], metavar="FIXTURE:REGIME",
                   help="with --merge: more cells to mark (dev), e.g. those a later change of the rule was found on")
    args = p.parse_args(argv)
    if args.merge:
        cells = [json.loads(line) for folder in args.merge
                 for line in (folder / "cells.jsonl").read_text().splitlines()]
        newer = {(c["fixture"], c["regime"], c["budget"]): c for folder in args.defaults
                 for c in map(json.loads, (folder / "cells.jsonl").read_text().splitlines())}
        for cell in cells:
            update = newer.get((cell["fixture"], cell["regime"], cell["budget"]))
            if update is not None:
                cell.update({k: update.get(k) for k in ("default", "default_method", "default_seconds",
                                                        "default_rule")})
        development = DEVELOPMENT_CELLS | {tuple(pair.split(":")) for pair in args.development}
        return write_summary([c for c in cells if "best_baseline" in c], args.out, development)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "cells.jsonl"
    done = {(c["fixture"], c["regime"], c["budget"]) for c in map(json.loads, log.read_text().splitlines())} \
        if log.is_file() else set()
    for fixture in args.fixtures.split(","):
        tokenizer, model, streams = load_fixture(fixture)
        dense = heldout_perplexity(model, streams)
        for regime in args.regimes.split(","):
            budgets = [float(b) for b in args.budgets.split(",") if (fixture, regime, float(b)) not in done]
            if not budgets:
                continue
            scores = regime_scores(model, tokenizer, fixture, regime, args.out, args.samples, args.seq_len, args.seed)
            for budget in budgets:
                start = time.perf_counter()
                cell = {"fixture": fixture, "regime": regime, "budget": budget,
                        **run_cell(model, tokenizer, scores, streams, budget, dense, args.only_default)}
                cell["seconds"] = time.perf_counter() - start
                with log.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
                print(f"{fixture:8s} {regime:7s} {budget:5.3f} dense {dense:.2f} best baseline "
                      f"{cell.get('best_baseline', float('nan')):.2f} ({cell.get('best_baseline_method')}) default "
                      f"{cell['default']:.2f} ({cell['default_method']}) kd "
                      f"{cell.get('uniform+ean+router-kd', float('nan')):.2f} [{cell['seconds']:.0f} s]", flush=True)
    if args.only_default:
        return 0
    return write_summary([json.loads(line) for line in log.read_text().splitlines()], args.out)


def write_summary(cells: list[dict], out: Path, development: set[tuple[str, str]] = DEVELOPMENT_CELLS) -> int:
    """The summary table of ``cells`` into OUT/battery.md (and stdout)."""
    order = {name: i for i, name in enumerate(FIXTURES)}
    cells.sort(key=lambda c: (order[c["fixture"]], c["regime"], c["budget"]))
    table = summary(cells, development)
    out.mkdir(parents=True, exist_ok=True)
    (out / "battery.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

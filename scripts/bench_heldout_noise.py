"""How much of a battery cell's ``default ÷ best baseline`` can its held-out text resolve?

    python scripts/bench_heldout_noise.py --fixtures demo,qwen2moe6 --regimes sources,mixed --budget 0.5

For each cell (fixture × calibration regime at one budget) this runs what ``scripts/bench_quality.py`` runs for the
default (same calibration windows, same seed, so the same choice) and every baseline (uniform / global × removal
signal, uncompensated), and keeps the held-out NLL of each non-overlapping 512-token held-out window. It reports:

- ``ratio``: default ÷ best baseline, the battery's number, and a paired bootstrap 95 % interval over held-out windows
  with the best baseline fixed (2,000 resamples of the windows, the same resample for both plans). An interval that
  holds 1 means the held-out text cannot tell whether the default lost or won the cell.
- ``honest``: the battery's best baseline is picked on the very windows it is measured on, so its perplexity is
  biased low (the least of eight noisy numbers). Picking it on a random half of the windows and measuring default and
  pick on the other half (200 random halves, both ways) gives the ratio that a baseline picked without seeing the
  text it is measured on would have. ``best baseline picked`` says how often the battery's own pick is the half-pick.

Nothing here feeds the defaults: it only measures the held-out text's resolution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

from fair_moe.metrics import stream_nll  # noqa: E402

SEQ_LEN = 512


def window_nll(model, streams: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n, 2]: summed next-token NLL and scored tokens of every non-overlapping ``SEQ_LEN`` window of every held-out
    stream (``stream_nll`` per window), in the order of ``bq.heldout_perplexity``, whose total it reproduces."""
    with torch.no_grad():
        return torch.tensor([stream_nll(model, ids[start : start + SEQ_LEN], SEQ_LEN, stride=SEQ_LEN)
                             for ids in streams.values() for start in range(0, max(1, len(ids) - 1), SEQ_LEN)],
                            dtype=torch.float64)


def ppl(rows: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Perplexity of windows ``rows [n, 2]`` (or, with ``index [b, m]``, of each of b resamples of them) → [] or [b]."""
    if index is None:
        return torch.exp(rows[:, 0].sum() / rows[:, 1].sum())
    picked = rows[index]  # [b, m, 2]
    return torch.exp(picked[..., 0].sum(-1) / picked[..., 1].sum(-1))


def bootstrap_ratio(default: torch.Tensor, best: torch.Tensor, draws: int, gen: torch.Generator) -> tuple[float, float]:
    """Paired bootstrap 2.5 % / 97.5 % quantiles of ppl(default) ÷ ppl(best) over resampled windows."""
    index = torch.randint(len(default), (draws, len(default)), generator=gen)
    ratios = ppl(default, index) / ppl(best, index)
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def honest_ratio(default: torch.Tensor, baselines: dict[str, torch.Tensor], battery_pick: str, halves: int,
                 gen: torch.Generator) -> tuple[float, float]:
    """Mean ratio default ÷ baseline where the baseline is picked on one half of the windows and both are measured
    on the other half (each random half used both ways), and the share of picks equal to ``battery_pick``."""
    n = len(default)
    ratios, same = [], 0
    for _ in range(halves):
        order = torch.randperm(n, generator=gen)
        for pick_on, measure_on in ((order[: n // 2], order[n // 2 :]), (order[n // 2 :], order[: n // 2])):
            pick = min(baselines, key=lambda name: ppl(baselines[name][pick_on]).item())
            same += pick == battery_pick
            ratios.append((ppl(default[measure_on]) / ppl(baselines[pick][measure_on])).item())
    return sum(ratios) / len(ratios), same / len(ratios)


def run_cell(model, scores, streams, budget: float, draws: int, halves: int, seed: int) -> dict:
    """The cell's default and baselines, per window, and the numbers the module docstring names."""
    from fair_moe.core.budget import Budget
    from fair_moe.strategies.selection import reference

    plan, method = bq.default_plan(model, scores, budget)
    with reference(model, bq.EXPERTS, plan.kept, plan.compensation):
        default = window_nll(model, streams)
    baselines = {}
    for allocation in bq.BASELINE_ALLOCATIONS:
        for signal in bq.BASELINE_SIGNALS:
            if signal in scores.removal:
                kept = bq.make_plan(scores, Budget(budget), allocation, signal).kept
                with reference(model, bq.EXPERTS, kept, None):
                    baselines[f"{allocation}+{signal}"] = window_nll(model, streams)
    best = min(baselines, key=lambda name: ppl(baselines[name]).item())
    gen = torch.Generator().manual_seed(seed)
    low, high = bootstrap_ratio(default, baselines[best], draws, gen)
    honest, same = honest_ratio(default, baselines, best, halves, gen)
    return {"default_method": method, "default": ppl(default).item(), "best_baseline_method": best,
            "best_baseline": ppl(baselines[best]).item(), "ratio": (ppl(default) / ppl(baselines[best])).item(),
            "ratio_low": low, "ratio_high": high, "honest_ratio": honest, "battery_pick_share": same,
            "windows": len(default)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default="demo,mixtral,deepseek,qwen3,olmoe,qwen2moe6,olmoe16")
    p.add_argument("--regimes", default="sources,mixed")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--halves", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="folder for cells.jsonl (cells already there are kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "cells.jsonl"
    cells = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(c["fixture"], c["regime"], c["budget"]) for c in cells}
    for fixture in args.fixtures.split(","):
        tokenizer, model, streams = bq.load_fixture(fixture)
        for regime in args.regimes.split(","):
            if (fixture, regime, args.budget) in done:
                continue
            scores = bq.regime_scores(model, tokenizer, fixture, regime, args.out, args.samples, SEQ_LEN, args.seed)
            cell = {"fixture": fixture, "regime": regime, "budget": args.budget,
                    **run_cell(model, scores, streams, args.budget, args.draws, args.halves, args.seed)}
            cells.append(cell)
            with log.open("a") as f:
                f.write(json.dumps(cell) + "\n")
            print(f"{fixture:9s} {regime:7s} default {cell['default']:.2f} ({cell['default_method']}) best baseline "
                  f"{cell['best_baseline']:.2f} ({cell['best_baseline_method']}) ratio {cell['ratio']:.3f} "
                  f"[{cell['ratio_low']:.3f}, {cell['ratio_high']:.3f}] honest {cell['honest_ratio']:.3f}", flush=True)
    print(table(cells))
    return 0


def table(cells: list[dict]) -> str:
    lines = ["| fixture | regime | budget | default | best baseline | default ÷ best baseline (95 % interval) | "
             "honest pick: default ÷ baseline | battery's pick = half-pick |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['fixture']} | {c['regime']} | {c['budget']} | {c['default']:.2f} ({c['default_method']}) | "
                     f"{c['best_baseline']:.2f} ({c['best_baseline_method']}) | {c['ratio']:.3f} "
                     f"({c['ratio_low']:.3f} – {c['ratio_high']:.3f}) | {c['honest_ratio']:.3f} | "
                     f"{c['battery_pick_share']:.0%} |")
    if cells:
        lines.append(f"\nmean ratio {sum(c['ratio'] for c in cells) / len(cells):.3f}, mean honest ratio "
                     f"{sum(c['honest_ratio'] for c in cells) / len(cells):.3f}, over {len(cells)} cells; worst ratio "
                     f"{max(c['ratio'] for c in cells):.3f} (upper end {max(c['ratio_high'] for c in cells):.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Replay ``--allocation auto``'s decision offline on the battery's recorded judge KLs, for its rule and variants.

    python scripts/bench_replay_rule.py bench_out/replay_qwen2moe6_sources bench_out/replay_qwen2moe6_mixed

Each full cell of ``scripts/bench_quality.py`` records, for every fixed configuration, the per-window KL(dense ‖
pruned) on all judging windows (``judge``) beside its held-out perplexity. This script runs a decision rule on those
numbers — the judging the CLI does, with the same screening, looks and clear-margin test (``strategies.selection``)
— and reports the held-out perplexity of what the rule would have chosen, divided by the cell's best baseline. A
rule variant is then measured over every recorded cell in seconds instead of hours of reruns. Develop a variant on
development cells (``bench_quality.DEVELOPMENT_CELLS``) and read the check cells only to confirm it.

Limits (said in the output too): the compensation decision is replayed over none, the layer scale and router KD
only where router KD was recorded — for the plan the default's own run chose (decided on that run's compensation
rows, and priced at the run's own perplexity where the rule makes the run's choice) and for uniform + ean (the
battery's fit); another plan is priced without router KD, which favours the rule the cell was run under. The
battery fits the layer scale on 64 calibration windows where the CLI fits on 32. Each rule's plan is compared with
what the default's own run chose: for the rule the recorded run used, a check of the replay.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import DEVELOPMENT_CELLS, default_ratio  # noqa: E402

from fair_moe.strategies import selection  # noqa: E402

CANDIDATE_ALLOCATIONS = ("tod", "uniform", "global")  # the CLI's order, so that equal plans tie alike
CANDIDATE_SIGNALS = ("reap", "frequency", "ean", "wasserstein")  # auto's candidates (consensus is opt-in)
COMPENSATIONS = ("none", "layer-scale", "router-kd")  # router KD is recorded for uniform + ean alone


def windows(cell: dict, name: str) -> torch.Tensor:
    return torch.tensor(cell["judge"]["kl"][name], dtype=torch.float64)


class RecordedLooks:
    """The second look of ``selection.judge_in_looks``, over recorded windows (it only asks whether there is one)."""

    def __init__(self, has_second: bool):
        self.has_second = has_second

    def second(self):
        return "second" if self.has_second else None


def judged(cell: dict, names: list[str], default: str, clear: Callable[[dict], bool], screen: bool) -> str:
    """The name a rule chooses among ``names`` (``default`` kept unless a rival is ``clear``), judged by the CLI's
    own code (``selection.judge_in_looks``, with ``clear`` as its clear-margin test): screening on
    the first quarter of the first look, the first look, the second look for undecided rivals."""
    first_look = cell["judge"]["first_look"] or len(cell["judge"]["kl"][default])
    full = {name: windows(cell, name) for name in names}
    racing = names
    if screen and first_look >= 8:
        quarter = max(4, first_look // 4)
        racing = [n for n in names if n == default
                  or not selection.clearly_worse(full[n][:quarter], full[default][:quarter])]
    first = {i: full[n][:first_look] for i, n in enumerate(racing)}
    _, _, chosen, _ = selection.judge_in_looks(lambda part, i: full[racing[i]][first_look:], first,
                                               racing.index(default), RecordedLooks(len(full[default]) > first_look),
                                               clear)
    return racing[chosen]


def compensated(cell: dict, plan: str) -> list[str]:
    """The compensation decision's candidates for ``plan``: none, the layer scale, and router KD where the cell
    recorded it for that plan (uniform + ean)."""
    return [plan] + [f"{plan}+{c}" for c in COMPENSATIONS[1:] if f"{plan}+{c}" in cell["judge"]["kl"]]


def plan_of(name: str) -> str:
    """The plan (allocation + signal) of a configuration's name, without its compensation."""
    return "+".join(name.split("+")[:2])


def run_plan(cell: dict) -> str:
    """The plan the default's own run chose."""
    return plan_of(cell["default_method"])


def compensation_for(cell: dict, plan: str, clear: Callable[[dict], bool], fallback: str | None = None) -> str:
    """The compensation decision for ``plan``. Where it is the plan the default's own run chose, the rule decides on
    that run's recorded compensation rows (none, the layer scale and router KD, each fitted by the CLI for this
    plan), so router KD is priced for any plan the run chose; elsewhere on the recorded window KLs (``compensated``).
    With a ``fallback`` (a compensation's name), a decision that keeps none takes the fallback instead unless none
    beats it clearly on the recorded window KLs."""
    rows = cell.get("default_selection", {}).get("compensations")
    name = None
    if plan == run_plan(cell) and rows and "none" in rows:
        names = ["none"] + [n for n in rows if n != "none"]
        pick = names[selection.clear_winner([rows[n] for n in names], 0, clear)]
        name = plan if pick == "none" else f"{plan}+{pick}"
        if name != cell["default_method"] and name not in cell:
            name = None
    if name is None:
        name = judged(cell, compensated(cell, plan), plan, clear, screen=False)
    alternative = f"{plan}+{fallback}"
    if fallback is None or name != plan or alternative not in cell["judge"]["kl"]:
        return name
    return judged(cell, [alternative, plan], alternative, clear, screen=False)


def perplexity(cell: dict, name: str) -> float:
    """Held-out perplexity of a configuration: the default run's own where it is that run's choice (its compensation
    fitted as the CLI fits it), else the battery's recorded one."""
    return cell["default"] if name == cell["default_method"] else cell[name]


def rule(default_plan: str = "uniform+ean", clear: Callable[[dict], bool] = selection.clearly_better,
         screen: bool = True, fallback: str | None = None) -> Callable[[dict], str]:
    """A decision rule: the plan, then its compensation (``compensation_for``, with ``fallback`` where it keeps
    none), each by ``clear``."""

    def decide(cell: dict) -> str:
        plans = [f"{a}+{s}" for a in CANDIDATE_ALLOCATIONS for s in CANDIDATE_SIGNALS
                 if f"{a}+{s}" in cell["judge"]["kl"]]
        chosen = judged(cell, plans, default_plan if default_plan in plans else plans[0], clear, screen)
        return compensation_for(cell, chosen, clear, fallback)

    return decide


def joint_rule(clear: Callable[[dict], bool] = selection.clearly_better) -> Callable[[dict], str]:
    """Plan and compensation chosen together: every candidate plan with and without the layer scale."""

    def decide(cell: dict) -> str:
        plans = [f"{a}+{s}" for a in CANDIDATE_ALLOCATIONS for s in CANDIDATE_SIGNALS
                 if f"{a}+{s}" in cell["judge"]["kl"]]
        names = plans + [f"{p}+layer-scale" for p in plans]
        return judged(cell, names, "uniform+ean", clear, screen=True)

    return decide


def as_written(clear: Callable[[dict], bool] = selection.clearly_better) -> Callable[[dict], str]:
    """Plans judged as they would be written (tried in the CLI on 2026-12-01, not adopted: README): every plan that
    passes screening is also a candidate with its own layer scale, in the same race against the bare default; then
    the compensation is decided for the chosen plan (none, the layer scale, and router KD where recorded)."""

    def decide(cell: dict) -> str:
        plans = [f"{a}+{s}" for a in CANDIDATE_ALLOCATIONS for s in CANDIDATE_SIGNALS
                 if f"{a}+{s}" in cell["judge"]["kl"]]
        first_look = cell["judge"]["first_look"] or len(cell["judge"]["kl"]["uniform+ean"])
        quarter = max(4, first_look // 4) if first_look >= 8 else first_look
        default = windows(cell, "uniform+ean")[:quarter]
        passed = [p for p in plans if p == "uniform+ean"
                  or not selection.clearly_worse(windows(cell, p)[:quarter], default)]
        names = plans + [f"{p}+layer-scale" for p in passed]
        plan = judged(cell, names, "uniform+ean", clear, screen=True).removesuffix("+layer-scale")
        return compensation_for(cell, plan, clear)

    return decide


def mean_only(z: float) -> Callable[[dict], bool]:
    return lambda row: row["gain_vs_default"] > z * row["gain_se"]


def with_z(z: float) -> Callable[[dict], bool]:
    return lambda row: (row["gain_vs_default"] > z * row["gain_se"]
                        or (selection.sign_z(row) > z and not selection.one_window_loss(row)))


previous_clear = with_z(2.0)  # the rule before 2026-12-02: the sign test excused a mean loss down to -1 se


RULES: dict[str, Callable[[dict], str]] = {
    "current (sign test needs gain > 1 se; plans judged bare)": rule(),
    "previous (sign test excuses gain > -1 se)": rule(clear=previous_clear),
    "current, layer scale kept unless none is clearly better": rule(fallback="layer-scale"),
    "plans also judged with their layer scale (tried, not adopted)": as_written(previous_clear),
    "previous, z=3": rule(clear=with_z(3.0)),
    "previous, z=1.5": rule(clear=with_z(1.5)),
    "no screening": rule(screen=False),
    "previous, no screening": rule(screen=False, clear=previous_clear),
    "mean test only": rule(clear=mean_only(2.0)),
    "no screening, sign test needs gain > 0": rule(screen=False, clear=lambda row: (
        row["gain_vs_default"] > 2 * row["gain_se"] or (selection.sign_z(row) > 2 and row["gain_vs_default"] > 0))),
    "lowest mean KL (no default)": rule(clear=lambda row: True, screen=False),
    "joint plan × {none, layer scale}": joint_rule(previous_clear),
}


def rank_agreement(cell: dict) -> float:
    """Spearman's rank correlation, over every recorded configuration of a cell, between its mean judge KL and its
    held-out perplexity: how far the judging windows tell what held-out text tells."""
    names = list(cell["judge"]["kl"])
    kl = torch.tensor([windows(cell, n).mean().item() for n in names])
    ppl = torch.tensor([cell[n] for n in names])

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(x)).double()

    a, b = ranks(kl), ranks(ppl)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def report(cells: list[dict]) -> str:
    lines = ["| rule | cells | worst ÷ best baseline | mean | mean at 0.5 | worst on check cells | chosen = default's "
             "plan |", "|---|---|---|---|---|---|---|"]
    choices = {name: [decide(cell) for cell in cells] for name, decide in RULES.items()}  # each rule decides once
    for name in RULES:
        ratios, half, check, same = [], [], [], 0
        for cell, chosen in zip(cells, choices[name], strict=True):
            ratio = perplexity(cell, chosen) / cell["best_baseline"]
            ratios.append(ratio)
            half += [ratio] if cell["budget"] == 0.5 else []
            check += [ratio] if (cell["fixture"], cell["regime"]) not in DEVELOPMENT_CELLS else []
            same += plan_of(chosen) == run_plan(cell)
        lines.append(f"| {name} | {len(cells)} | {max(ratios):.3f} | {sum(ratios) / len(ratios):.3f} | "
                     + (f"{sum(half) / len(half):.3f}" if half else "–") + " | "
                     + (f"{max(check):.3f}" if check else "–") + f" | {same} of {len(cells)} |")
    lines += ["", "Compensation over none / layer scale, and router KD where it was recorded: for the plan the "
              "default's own run chose (its compensation rows, and its perplexity where the rule makes its choice) "
              "and for uniform + ean; 'chosen = default's plan' counts the cells where the replayed plan is the one "
              "the default's own run chose (for the rule that run used, a check of the replay)."]
    per_cell = ["", "| fixture | regime | budget | judge ↔ held-out rank correlation | best baseline | "
                "default (its run) | " + " | ".join(RULES) + " |", "|---|---|---|---|---|---|" + "---|" * len(RULES)]
    for index, cell in enumerate(cells):
        picks = [f"{chosen} {perplexity(cell, chosen) / cell['best_baseline']:.3f}"
                 for chosen in (choices[name][index] for name in RULES)]
        per_cell.append(f"| {cell['fixture']} | {cell['regime']} | {cell['budget']} | {rank_agreement(cell):.2f} | "
                        f"{cell['best_baseline']:.2f} ({cell['best_baseline_method']}) | {cell['default_method']} "
                        f"{default_ratio(cell):.3f} | " + " | ".join(picks) + " |")
    return "\n".join(lines + per_cell)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+", help="bench_quality.py --out folders (their cells.jsonl)")
    args = p.parse_args(argv)
    cells = [c for folder in args.folders for c in map(json.loads, (folder / "cells.jsonl").read_text().splitlines())
             if "judge" in c]
    if not cells:
        print("no cell with recorded judge KLs (run scripts/bench_quality.py without --only-default)", file=sys.stderr)
        return 2
    print(report(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

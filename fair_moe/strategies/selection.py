"""``--allocation auto`` and ``--compensate auto``: choose by measuring the pruned model [ours].

Judging. Every candidate is run as the exact masked model (removed units unreachable; the test suite proves it
equal to the rewritten checkpoint) on judging windows: calibration-source text the scores were not computed
from. It is scored per window by KL(dense ‖ pruned) of the next-token distributions (``DenseReference``): the
dense model is at hand, and unlike the cross-entropy the KL carries none of the text's own entropy, so far
fewer tokens tell candidates apart.

Screening. Every candidate is first judged on the first quarter of the windows; one that is worse than the
default there by more than ``Z`` paired standard errors of the mean, and higher on most of those windows, is
dropped, and only the rest are judged on every window (most candidates are clearly worse, so this saves most of
the judging time without changing the decision).

Deciding. A simple default is kept unless a rival beats it clearly: ``DEFAULT_PLAN`` (uniform allocation with
the ean signal — the plainest baseline) stays unless rivals improve on it window by window: either their paired
mean gain exceeds ``Z`` standard errors of the paired difference, or they are lower on clearly more windows than
higher (a sign test, z > ``Z``) while their mean gain is not clearly negative. The second test is there because
window KLs are heavy-tailed: one low-entropy window (a table, repeated boilerplate) can hold most of a
candidate's mean, so a rival lower on 15 of 16 windows can fail the mean test. Of the clear rivals the one with
the lowest mean KL is taken (the expected divergence is what held-out perplexity follows; picking by the median
was tried and chose plans that are good on typical windows and bad on the rest). Taking the lowest of many noisy
means favours the luckiest candidate (the winner's curse); a clear paired margin is what survives it. Every
candidate's mean, median, standard error, paired gain, wins and losses, and the rule, are recorded in the plan.
Compensations are decided the same way, for the chosen plan: each auto candidate (fitted on calibration windows)
against none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.core.lazy import lazy_module
from fair_moe.core.plan import CompensationRecord, PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.metrics import DenseReference, mean_loss, paired_difference
from fair_moe.strategies import AUTO
from fair_moe.strategies.allocations import ALLOCATIONS
from fair_moe.strategies.compensations import COMPENSATIONS, Compensation, FitData, options_for
from fair_moe.strategies.planning import make_plan
from fair_moe.strategies.signals import REMOVAL_SIGNALS
from fair_moe.units.base import UnitKind

torch = lazy_module("torch")
DEFAULT_PLAN = ("uniform", "ean")  # kept unless a rival is clearly better (module docstring)
Z = 2.0  # standard errors a rival's paired gain must exceed
CRITERION = "KL(dense || pruned) of next-token distributions (top-32 tokens + rest), mean per window"
CLEAR = (f"paired per window, a mean gain above {Z:g} standard errors, or lower on clearly more windows than "
         f"higher (sign test z > {Z:g}) with a mean gain not below -{Z:g} standard errors")
RULE = (f"keep {DEFAULT_PLAN[0]}+{DEFAULT_PLAN[1]} unless candidates beat it clearly ({CLEAR}); then the one of "
        "those with the lowest mean KL")
COMPENSATION_RULE = (f"keep no compensation unless auto candidates beat none clearly ({CLEAR}); then the one of "
                     "those with the lowest mean KL")
COMPENSATION_FIT_WINDOWS = 32  # calibration windows a compensation is fitted on


@dataclass
class Selection:
    """The chosen plan; ``judge`` the dense reference it was judged with (reused to decide its compensation)."""

    plan: PrunePlan
    judge: DenseReference | None = None


def reference(model, unit: UnitKind, kept: dict[int, list[int]], record: CompensationRecord | None
              ) -> contextlib.AbstractContextManager:
    """The model as the checkpoint of (kept, record) will be: compensation reference first, then the masking."""
    stack = contextlib.ExitStack()
    if record is not None:
        stack.enter_context(COMPENSATIONS.get(record.kind).reference(model, record))
    stack.enter_context(unit.masked(model, kept))
    return stack


def judged_loss(model, unit: UnitKind, kept, record: CompensationRecord | None, ids, batch_size: int) -> float:
    """Mean cross-entropy of the pruned model on ``ids`` (kept for scripts and benchmarks)."""
    with reference(model, unit, kept, record):
        return mean_loss(model, ids, batch_size)


def window_kl(judge: DenseReference, model, unit: UnitKind, kept, record: CompensationRecord | None):
    """Per-window KL(dense ‖ pruned) [n] of the plan (kept, record)."""
    with reference(model, unit, kept, record):
        return judge.window_kl(model)


def judging_windows(scores: Scores):
    ids = scores.selection_ids
    if ids is None or len(ids) == 0:
        raise FairMoeError("--allocation auto needs calibration text the scores did not use, and none was left: "
                           "pass more calibration text, lower --samples, or pick --allocation "
                           + "|".join(ALLOCATIONS.names()))
    return ids


def _summary(kl, default_kl) -> dict:
    gain, gain_se = paired_difference(default_kl, kl)
    se = kl.std(unbiased=True).item() / len(kl) ** 0.5 if len(kl) > 1 else float("inf")
    diff = default_kl - kl
    return {"kl_mean": kl.mean().item(), "kl_se": se, "kl_median": kl.median().item(), "gain_vs_default": gain,
            "gain_se": gain_se, "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


def sign_z(row: dict) -> float:
    """The sign test's z of a row's paired windows: (wins − losses) / √(wins + losses), 0 without any."""
    decided = row.get("wins", 0) + row.get("losses", 0)
    return (row.get("wins", 0) - row.get("losses", 0)) / decided ** 0.5 if decided else 0.0


def clearly_better(row: dict) -> bool:
    """A rival clearly beats the default: its paired mean gain exceeds ``Z`` standard errors, or it is lower on
    clearly more windows than it is higher (sign test z > ``Z``) without a mean gain clearly below zero. Window
    KLs are heavy-tailed (a single low-entropy window, a table or repeated boilerplate, can hold most of a
    candidate's mean), which a mean test alone cannot see past."""
    gain, se = row["gain_vs_default"], row["gain_se"]
    return gain > Z * se or (sign_z(row) > Z and gain > -Z * se)


def clearly_worse(kl, default_kl) -> bool:
    """Worse than the default by more than ``Z`` paired standard errors on the mean and higher on most windows
    (dropped at screening)."""
    row = _summary(kl, default_kl)
    return row["gain_vs_default"] < -Z * row["gain_se"] and row["losses"] > row["wins"]


def clear_winner(rows: list[dict], default_index: int) -> int:
    """The rule: of the rows that clearly beat the default (``clearly_better``), the one with the lowest mean
    window KL (the expected divergence, which held-out perplexity follows); the default when there is none."""
    clear = [i for i, row in enumerate(rows) if i != default_index and clearly_better(row)]
    return min(clear, key=lambda i: (rows[i]["kl_mean"], i)) if clear else default_index


def select_plan(model, unit: UnitKind, scores: Scores, budget: Budget, compensation: str = "none",
                protection: str = "taylor", min_keep: int | None = None, base_model: str | None = None,
                batch_size: int = 4, progress: bool = True, seed: int = 0, options: tuple[str, ...] = (),
                layout: str = "any") -> Selection:
    """The default plan, or a rival that is clearly better on the judging windows (module docstring)."""
    from tqdm.auto import tqdm

    ids = judging_windows(scores)
    judge = DenseReference(model, ids, batch_size)
    combos = [(rule.name, signal.name) for rule in ALLOCATIONS
              if rule.auto_candidate and (layout == "any" or rule.even_counts)
              for signal in REMOVAL_SIGNALS if signal.auto_candidate and signal.name in scores.removal]
    if DEFAULT_PLAN not in combos:
        raise FairMoeError(f"--allocation auto needs its default {'+'.join(DEFAULT_PLAN)} among the candidates")
    plans = [make_plan(scores, budget, a, r, protection, min_keep, base_model) for a, r in combos]
    default_index = combos.index(DEFAULT_PLAN)
    screen, rest = judge.split(max(4, len(ids) // 4)) if len(ids) >= 8 else (judge, None)
    seen: dict = {}

    def kl_on(part, plan):
        key = (id(part), tuple(tuple(v) for _, v in sorted(plan.kept.items())))
        if key not in seen:
            seen[key] = window_kl(part, model, unit, plan.kept, None)
        return seen[key]

    bar = tqdm(total=len(combos) * 2, desc="judging candidate plans", disable=not progress)
    first = []
    for plan in plans:
        first.append(kl_on(screen, plan))
        bar.update()
    kept = [i for i, kl in enumerate(first) if i == default_index or not clearly_worse(kl, first[default_index])]
    kls: dict[int, object] = {}
    for i in range(len(plans)):
        if i in kept:
            kls[i] = first[i] if rest is None else torch.cat([first[i], kl_on(rest, plans[i])])
        bar.update()
    bar.close()
    rows = []
    for i, ((a, r), plan) in enumerate(zip(combos, plans, strict=True)):
        kl = kls.get(i, first[i])
        reference_kl = kls[default_index] if i in kls else first[default_index]
        rows.append({"allocation": a, "removal": r, "alpha": plan.alpha, "screened_out": i not in kls,
                     **_summary(kl, reference_kl)})
    finalists = [i for i in range(len(rows)) if i in kls]
    chosen = finalists[clear_winner([rows[i] for i in finalists], finalists.index(default_index))]
    best = plans[chosen]
    best.settings = {
        **best.settings,
        "allocation": AUTO,
        "selected": {"allocation": combos[chosen][0], "removal": combos[chosen][1], "compensation": "none",
                     "kl_mean": rows[chosen]["kl_mean"]},
        "selection": {"criterion": CRITERION, "rule": RULE, "windows": len(ids), "tokens": judge.tokens,
                      "screening": f"on {len(screen)} windows first; dropped when worse than the default by more "
                                   f"than {Z:g} paired standard errors",
                      "default": "+".join(DEFAULT_PLAN), "dense_loss": mean_loss(model, ids, batch_size)},
        "candidates": rows,
    }
    return Selection(best, judge)


def decide_compensation(model, unit: UnitKind, plan: PrunePlan, scores: Scores, kind: str,
                        batch_size: int = 4, seed: int = 0, options: tuple[str, ...] = (),
                        progress: bool = False, judge: DenseReference | None = None,
                        writable: frozenset[str] | None = None) -> PrunePlan:
    """Fit the chosen compensation on calibration windows and record it in the plan (the weights are untouched
    until writing). ``auto`` fits every auto candidate whose kind of change the output format can hold
    (``writable``, e.g. router-only changes for MXFP4; None = any) and keeps one only when it beats none clearly on
    the judging windows (``COMPENSATION_RULE``), which no fit ever sees; the decision is recorded in the plan."""
    if kind == "none" or not unit.takes_compensation:
        return plan
    ids = scores.calibration_subset(COMPENSATION_FIT_WINDOWS)
    if ids is None:
        raise FairMoeError("--compensate needs the calibration windows, which this scores file lacks: "
                           "calibrate again or pass --compensate none")

    def fit(compensation: Compensation) -> CompensationRecord | None:
        return compensation.fit(model, plan.kept,
                                FitData(ids, batch_size, seed, options_for(compensation, options), progress))

    if kind != AUTO:
        chosen = COMPENSATIONS.get(kind)
        reason = chosen.unavailable(model)
        if reason:
            raise FairMoeError(f"--compensate {kind} cannot be applied to this model: {reason}; pick another "
                               "--compensate (or auto)")
        plan.compensation = fit(chosen)
        return plan
    held = scores.selection_ids
    if held is None or len(held) == 0:
        return plan
    judge = judge if judge is not None else DenseReference(model, held, batch_size)
    candidates = [c for c in COMPENSATIONS if c.auto_candidate]
    left_out = {c.name: f"changes {c.writes}, which the output's quantized format cannot hold exactly"
                for c in candidates if writable is not None and c.writes not in writable}
    left_out.update({c.name: reason for c in candidates if c.name not in left_out and (reason := c.unavailable(model))})
    records = [None] + [fit(c) for c in candidates if c.name not in left_out]
    kls = [window_kl(judge, model, unit, plan.kept, record) for record in records]
    rows = [{"compensation": record.kind if record else "none", **_summary(kl, kls[0])}
            for record, kl in zip(records, kls, strict=True)]
    chosen = clear_winner(rows, 0)
    plan.compensation = records[chosen]
    decision = {"criterion": CRITERION, "rule": COMPENSATION_RULE, "candidates": rows,
                **({"not_considered": left_out} if left_out else {})}
    selected = plan.settings.get("selected")
    plan.settings = {**plan.settings, "compensation_decision": decision,
                     **({"selected": {**selected, "compensation": rows[chosen]["compensation"]}} if selected else {})}
    return plan

"""``--allocation auto`` and ``--compensate auto``: choose by measuring the pruned model [ours].

Every candidate plan (each allocation rule × each removal signal marked ``auto_candidate``, at the exact
budget) is judged by the exact masked forward (removed units unreachable, no rewrite), which the test
suite proves equal to the rewritten checkpoint, on calibration-source windows the scores were not
computed from; the lowest loss wins (the first of equal losses, in registry order). With a compensation
that is an auto candidate, each candidate is judged with that compensation fitted to it too.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import CompensationRecord, PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.metrics import mean_loss
from fair_moe.strategies import AUTO
from fair_moe.strategies.allocations import ALLOCATIONS
from fair_moe.strategies.compensations import COMPENSATIONS, Compensation, FitData, options_for
from fair_moe.strategies.planning import make_plan
from fair_moe.strategies.signals import REMOVAL_SIGNALS
from fair_moe.units.base import UnitKind

FIT_WINDOWS = 32  # calibration windows a candidate's compensation is fitted on during selection
COMPENSATION_FIT_WINDOWS = 64  # calibration windows the chosen compensation is fitted on after a fixed allocation


@dataclass
class Selection:
    """The chosen plan; ``compensation_settled`` when selection already decided its compensation."""

    plan: PrunePlan
    compensation_settled: bool


def reference(model, unit: UnitKind, kept: dict[int, list[int]], record: CompensationRecord | None
              ) -> contextlib.AbstractContextManager:
    """The model as the checkpoint of (kept, record) will be: compensation reference first, then the masking."""
    stack = contextlib.ExitStack()
    if record is not None:
        stack.enter_context(COMPENSATIONS.get(record.kind).reference(model, record))
    stack.enter_context(unit.masked(model, kept))
    return stack


def judged_loss(model, unit: UnitKind, kept, record: CompensationRecord | None, ids, batch_size: int) -> float:
    with reference(model, unit, kept, record):
        return mean_loss(model, ids, batch_size)


def judged_compensations(kind: str) -> list[Compensation | None]:
    """What each candidate is judged with: nothing, and/or the auto-candidate compensations."""
    if kind == AUTO:
        return [None, *[c for c in COMPENSATIONS if c.auto_candidate]]
    chosen = COMPENSATIONS.get(kind)
    return [chosen] if chosen.auto_candidate else [None]


def _loss_key(compensation: Compensation | None) -> str:
    return "loss" if compensation is None else "loss_" + compensation.name.replace("-", "_")


def select_plan(model, unit: UnitKind, scores: Scores, budget: Budget, compensation: str = "none",
                protection: str = "taylor", min_keep: int | None = None, base_model: str | None = None,
                batch_size: int = 4, progress: bool = True, seed: int = 0, options: tuple[str, ...] = (),
                layout: str = "any") -> Selection:
    """The lowest-loss candidate plan; every candidate's loss is recorded in ``plan.settings["candidates"]``."""
    from tqdm.auto import tqdm

    ids = scores.selection_ids
    if ids is None or len(ids) == 0:
        raise FairMoeError("--allocation auto needs calibration text the scores did not use, and none was left: "
                           "pass more calibration text, lower --samples, or pick --allocation "
                           + "|".join(ALLOCATIONS.names()))
    fit_ids = scores.calibration_subset(FIT_WINDOWS)
    judged = judged_compensations(compensation)
    if fit_ids is None or len(fit_ids) == 0:
        judged = [None]
    combos = [(rule.name, signal.name) for rule in ALLOCATIONS
              if rule.auto_candidate and (layout == "any" or rule.even_counts)
              for signal in REMOVAL_SIGNALS if signal.auto_candidate and signal.name in scores.removal]
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}
    for allocation, removal in tqdm(combos, desc="scoring candidate plans", disable=not progress):
        plan = make_plan(scores, budget, allocation, removal, protection, min_keep, base_model)
        key = tuple(tuple(v) for _, v in sorted(plan.kept.items()))
        if key not in seen:
            seen[key] = _judge(model, unit, plan.kept, judged, ids, fit_ids, batch_size, seed, options, progress)
        rows.append({"plan": plan, **seen[key]})

    best_row = min(rows, key=lambda r: r["best"][0])  # min keeps the first of equal losses
    best = best_row["plan"]
    best_loss, best_record = best_row["best"]
    best.compensation = best_record
    best.settings = {
        **best.settings,
        "allocation": AUTO,
        "selected": {"allocation": best.settings["allocation"], "removal": best.settings["removal"],
                     "compensation": best_record.kind if best_record else "none", "loss": best_loss},
        "selection": {"windows": len(ids), "tokens": int(ids[:, 1:].numel()),
                      "dense_loss": mean_loss(model, ids, batch_size)},
        "candidates": [
            {"allocation": r["plan"].settings["allocation"], "removal": r["plan"].settings["removal"],
             "alpha": r["plan"].alpha, **{k: v for k, v in r.items() if k.startswith("loss")},
             "perplexity": math.exp(r["best"][0])}
            for r in rows
        ],
    }
    return Selection(best, compensation_settled=any(c is not None for c in judged))


def _judge(model, unit, kept, judged, ids, fit_ids, batch_size, seed, options, progress) -> dict:
    """Losses of one candidate with each judged compensation; "best" is (lowest loss, its record)."""
    result: dict = {}
    outcomes = []
    for compensation in judged:
        record = None if compensation is None else compensation.fit(
            model, kept, FitData(fit_ids, batch_size, seed, options_for(compensation, options), progress))
        loss = judged_loss(model, unit, kept, record, ids, batch_size)
        result[_loss_key(compensation)] = loss
        outcomes.append((loss, record))
    result["best"] = min(outcomes, key=lambda o: o[0])
    return result


def decide_compensation(model, unit: UnitKind, plan: PrunePlan, scores: Scores, kind: str,
                        batch_size: int = 4, seed: int = 0, options: tuple[str, ...] = (),
                        progress: bool = False) -> PrunePlan:
    """Fit the chosen compensation on calibration windows and record it in the plan (the weights are untouched
    until writing). ``auto`` keeps an auto candidate only if it lowers the loss on the selection windows, which
    the fit never sees; a rejected fit is kept in ``settings["compensation_rejected"]``."""
    if kind == "none" or not unit.takes_compensation:
        return plan
    ids = scores.calibration_subset(COMPENSATION_FIT_WINDOWS)
    if ids is None:
        raise FairMoeError("--compensate needs the calibration windows, which this scores file lacks: "
                           "calibrate again or pass --compensate none")
    if kind != AUTO:
        chosen = COMPENSATIONS.get(kind)
        plan.compensation = chosen.fit(model, plan.kept,
                                       FitData(ids, batch_size, seed, options_for(chosen, options), progress))
        return plan
    held = scores.selection_ids
    if held is None or len(held) == 0:
        return plan
    plain = judged_loss(model, unit, plan.kept, None, held, batch_size)
    best: tuple[float, CompensationRecord] | None = None
    rejected = None
    for compensation in judged_compensations(AUTO)[1:]:
        record = compensation.fit(model, plan.kept,
                                  FitData(ids, batch_size, seed, options_for(compensation, options), progress))
        loss = judged_loss(model, unit, plan.kept, record, held, batch_size)
        record.fit.update(selection_loss_without=plain, selection_loss_with=loss)
        if loss < plain and (best is None or loss < best[0]):
            best = (loss, record)
        else:
            rejected = record
    if best is not None:
        plan.compensation = best[1]
    elif rejected is not None:
        plan.settings = {**plan.settings, "compensation_rejected": rejected.to_json()}
    return plan

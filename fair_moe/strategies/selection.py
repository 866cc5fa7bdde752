"""``--allocation auto`` and ``--compensate auto``: choose by measuring the pruned model [ours].

Judging. Every candidate is run as the exact masked model (removed units unreachable; the test suite proves it
equal to the rewritten checkpoint) on judging windows: calibration-source text the scores were not computed
from. It is scored per window by KL(dense ‖ pruned) of the next-token distributions (``DenseReference``): the
dense model is at hand, and unlike the cross-entropy the KL carries none of the text's own entropy, so far
fewer tokens tell candidates apart.

Looks. The judging windows come in two looks, each drawn in turn from every calibration source (so any prefix covers
every source): the first an eighth as many windows as the calibration, the second as many again (both from text left
over after the calibration windows were drawn, else held out of them). Every decision below is first taken on the
first look. When that leaves a rival undecided that could still win — halfway to clear (a paired gain above one
standard error, or a sign test z above 1) and with a mean KL below every clear rival's — it and the default (and the
best clear rival) are judged on the second look too, and the rule decides among them on both looks together. The
second look doubles the windows exactly where the first could not separate the plans (a gain of 1.9 standard errors
on 16 windows, say), and costs nothing where it could. Two looks at the same threshold make a false switch a little
likelier than one: for a rival no better than the default (normal noise, 16 + 16 windows) 5.6 % of draws switch
instead of 3.8 % (tests/strategies/test_selection.py); a clear margin on the windows judged is still needed.

Screening. Every candidate is first judged on the first quarter of the first look; one that is worse than the
default there by more than ``Z`` paired standard errors of the mean, and higher on most of those windows, is
dropped, and only the rest are judged on the whole first look (most candidates are clearly worse, so this saves most
of the judging time without changing the decision).

Deciding. A simple default is kept unless a rival beats it clearly: ``DEFAULT_PLAN`` (uniform allocation with the
ean signal — the plainest baseline) stays unless rivals improve on it window by window: either their paired mean
gain exceeds ``Z`` standard errors of the paired difference, or they are lower on clearly more windows than higher
(a sign test, z > ``Z``) while their mean gain is above ``SIGN_TEST_GAIN`` (one) standard error. The sign test lowers
the bar on the mean from two standard errors to one where a rival is lower on most windows; it does not replace the
mean. A first version let it excuse a mean loss of up to one standard error (what one heavy window can cost, since
window KLs are heavy-tailed: ``one_window_loss``), and before that of two; both took rivals whose mean was no better
than the default's and lost on held-out text, which follows the mean (on the demo at 0.5 a plan lower on 22 of 32
windows with a mean KL 64 % above the default's; on olmoe16 at 0.125 a plan lower on 30 of 32 windows with a gain
of +0.0001 ± 0.0038, over rivals whose mean KL was half the default's). Of the clear rivals the one with the lowest
mean KL is taken (the expected divergence is what held-out perplexity follows; picking by the median was tried and chose
plans that are good on typical windows and bad on the rest). Taking the lowest of many noisy means favours the
luckiest candidate (the winner's curse); a clear paired margin is what survives it. Every candidate's mean, median,
standard error, paired gain, wins and losses, and the rule, are recorded in the plan. Compensations are decided the
same way, for the chosen plan: each auto candidate (fitted on calibration windows) against none.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.core.lazy import lazy_module
from fair_moe.core.plan import CompensationRecord, PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.metrics import DenseReference, paired_difference
from fair_moe.strategies import AUTO
from fair_moe.strategies.allocations import ALLOCATIONS
from fair_moe.strategies.compensations import COMPENSATIONS, Compensation, FitData, options_for
from fair_moe.strategies.planning import make_plan
from fair_moe.strategies.signals import REMOVAL_SIGNALS
from fair_moe.units.base import UnitKind

torch = lazy_module("torch")
DEFAULT_PLAN = ("uniform", "ean")  # kept unless a rival is clearly better (module docstring)
Z = 2.0  # standard errors a rival's paired gain must exceed
SIGN_TEST_GAIN = 1.0  # standard errors a rival's paired gain must exceed when the sign test calls it clear
CRITERION = "KL(dense || pruned) of next-token distributions (top-32 tokens + rest), mean per window"
CLEAR = (f"paired per window, a mean gain above {Z:g} standard errors, or lower on clearly more windows than "
         f"higher (sign test z > {Z:g}) with a mean gain above {SIGN_TEST_GAIN:g} standard error")
RULE = (f"keep {DEFAULT_PLAN[0]}+{DEFAULT_PLAN[1]} unless candidates beat it clearly ({CLEAR}); then the one of "
        "those with the lowest mean KL")
COMPENSATION_RULE = (f"keep no compensation unless auto candidates beat none clearly ({CLEAR}); then the one of "
                     "those with the lowest mean KL")
COMPENSATION_FIT_WINDOWS = 32  # calibration windows a compensation is fitted on
EXTEND = 3  # rivals judged on the second look at most
LOOKS = ("decided on the first look of judging windows, unless a rival halfway to clear (gain > 1 standard error or "
         f"sign test z > 1) could still win: then it and the default are judged on the second look too (at most "
         f"{EXTEND} rivals, lowest mean first, the best clear one among them) and the rule decides on both looks")


class Looks:
    """The judging windows ``ids [n, S]`` in two looks: every candidate still in the race is judged on the first
    ``first_look`` windows (all when None); the rest are judged (their dense reference computed) only when the
    first look leaves a promising rival undecided (``to_extend``), for that rival and the default."""

    def __init__(self, model, ids, first_look: int | None = None, batch_size: int = 4):
        n = len(ids) if first_look is None else first_look
        self.model, self.batch_size, self.later_ids = model, batch_size, ids[n:]
        self.first = DenseReference(model, ids[:n], batch_size)
        self._second: DenseReference | None = None
        self._plain: dict = {}  # (look, kept experts) → window KLs of the plan without compensation

    def plain_kl(self, part: DenseReference, kept: dict[int, list[int]], compute: Callable[[], torch.Tensor]):
        """The window KLs [n] of an uncompensated plan on ``part`` (a look or a piece of one), computed once: the
        compensation decision judges the chosen plan without compensation on the looks selection already did."""
        key = (id(part), tuple(tuple(v) for _, v in sorted(kept.items())))
        if key not in self._plain:  # the part is kept with its value, so its id is not reused while the key is
            self._plain[key] = (part, compute())
        return self._plain[key][1]

    @classmethod
    def of(cls, model, scores: Scores, batch_size: int = 4) -> Looks:
        """The looks of a scores file's selection windows (one look for files written before there were two)."""
        ids = judging_windows(scores)
        return cls(model, ids, scores.meta.get("calibration", {}).get("first_look"), batch_size)

    def second(self) -> DenseReference | None:
        """The second look's dense reference (computed on first use), None when there are no windows for one."""
        if self._second is None and len(self.later_ids):
            self._second = DenseReference(self.model, self.later_ids, self.batch_size)
        return self._second

    def describe(self) -> dict:
        """The windows judged so far: the first look, and the second once it was taken."""
        second = self._second
        return {"windows": len(self.first) + (len(second) if second is not None else 0), "first_look": len(self.first),
                "second_look": len(second) if second is not None else 0,
                "tokens": self.first.tokens + (second.tokens if second is not None else 0),
                "dense_loss": self.first.dense_nll.mean().item()}


@dataclass
class Selection:
    """The chosen plan; ``judge`` the judging windows it was judged on (reused to decide its compensation)."""

    plan: PrunePlan
    judge: Looks | None = None


def reference(model, unit: UnitKind, kept: dict[int, list[int]], record: CompensationRecord | None
              ) -> contextlib.AbstractContextManager:
    """The model as the checkpoint of (kept, record) will be: compensation reference first, then the masking."""
    stack = contextlib.ExitStack()
    if record is not None:
        stack.enter_context(COMPENSATIONS.get(record.kind).reference(model, record))
    stack.enter_context(unit.masked(model, kept))
    return stack


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
    clearly more windows than it is higher (sign test z > ``Z``) and its mean gain exceeds ``SIGN_TEST_GAIN``
    standard errors. Window KLs are heavy-tailed, so a rival lower on almost every window can have a noisy mean;
    the sign test lets such a rival through on half the mean margin, never on none (module docstring)."""
    gain, se = row["gain_vs_default"], row["gain_se"]
    return gain > Z * se or (sign_z(row) > Z and gain > SIGN_TEST_GAIN * se)


def one_window_loss(row: dict) -> bool:
    """The paired mean gain is below −1 standard error: more loss than one window can make. When a single
    window's difference −a dominates n paired windows, the mean is −a/n and the standard error a/n (the window
    holds both), so the gain is −1 standard error at worst; two such windows give −√2. A rival lower on most
    windows whose gain is below −1 standard error loses on several windows, and the mean (which held-out
    perplexity follows) says it is worse."""
    return row["gain_vs_default"] <= -row["gain_se"]


def clearly_worse(kl, default_kl) -> bool:
    """Worse than the default by more than ``Z`` paired standard errors on the mean and higher on most windows
    (dropped at screening)."""
    row = _summary(kl, default_kl)
    return row["gain_vs_default"] < -Z * row["gain_se"] and row["losses"] > row["wins"]


def clear_winner(rows: list[dict], default_index: int, clear_test: Callable[[dict], bool] = clearly_better) -> int:
    """The rule: of the rows that clearly beat the default (``clear_test``, the CLI's ``clearly_better``), the one
    with the lowest mean window KL (the expected divergence, which held-out perplexity follows); the default when
    there is none."""
    clear = [i for i, row in enumerate(rows) if i != default_index and clear_test(row)]
    return min(clear, key=lambda i: (rows[i]["kl_mean"], i)) if clear else default_index


def promising(row: dict) -> bool:
    """Halfway to clear: a paired mean gain above one standard error, or a sign test z above 1 without more loss
    than one window can make (``one_window_loss``)."""
    return row["gain_vs_default"] > row["gain_se"] or (sign_z(row) > 1 and not one_window_loss(row))


def to_extend(rows: dict[int, dict], default: int, clear_test: Callable[[dict], bool] = clearly_better) -> list[int]:
    """The rivals the second look judges, given the first look's rows: the promising rivals that are not yet
    clear and whose mean KL is below every clear rival's (they could still win), lowest mean first, at most
    ``EXTEND`` together with the best clear rival (if any), which they have to beat on the same windows. Empty
    when the first look decided. ``clear_test`` says which rows are clear (the CLI's: ``clearly_better``)."""
    rivals = {i: row for i, row in rows.items() if i != default}
    clear = [i for i, row in rivals.items() if clear_test(row)]
    best_clear = min(clear, key=lambda i: (rivals[i]["kl_mean"], i)) if clear else None
    bar = rivals[best_clear]["kl_mean"] if clear else math.inf
    undecided = sorted((i for i, row in rivals.items() if i not in clear and promising(row) and row["kl_mean"] < bar),
                       key=lambda i: (rivals[i]["kl_mean"], i))
    if not undecided:
        return []
    lead = [best_clear] if clear else []
    return undecided[: EXTEND - len(lead)] + lead


def judge_in_looks(kl_on: Callable[[DenseReference, int], torch.Tensor], first: dict[int, torch.Tensor],
                   default: int, looks: Looks, clear_test: Callable[[dict], bool] = clearly_better
                   ) -> tuple[list[dict], dict[int, int], int, bool]:
    """Sequential judging of the candidates in the race (``first``: index → first-look window KLs [n1]).

    Returns one summary row per candidate (keyed like ``first``, in its order), the number of windows each row
    covers, the chosen index and whether the second look was taken. After the first look the rule decides unless
    ``to_extend`` names rivals; then those and the default are also judged on the second look
    (``kl_on(reference, index)`` → [n2]) and the rule decides among them on both looks together (the others are
    out: not promising, a higher mean than a clear rival, or beyond the ``EXTEND`` lowest means). ``clear_test``
    is the clear-margin test (the CLI's: ``clearly_better``; the offline replay passes variants)."""
    order = list(first)
    rows = {i: _summary(first[i], first[default]) for i in order}
    extend = to_extend(rows, default, clear_test)
    second = looks.second() if extend else None
    kls = dict(first)
    eligible = order
    if second is not None:
        eligible = [i for i in order if i == default or i in extend]
        for i in eligible:
            kls[i] = torch.cat([first[i], kl_on(second, i)])
        rows.update({i: _summary(kls[i], kls[default]) for i in eligible})
    chosen = eligible[clear_winner([rows[i] for i in eligible], eligible.index(default), clear_test)]
    return [rows[i] for i in order], {i: len(kls[i]) for i in order}, chosen, second is not None


def select_plan(model, unit: UnitKind, scores: Scores, budget: Budget, compensation: str = "none",
                protection: str = "taylor", min_keep: int | None = None, base_model: str | None = None,
                batch_size: int = 4, progress: bool = True, seed: int = 0, options: tuple[str, ...] = (),
                layout: str = "any") -> Selection:
    """The default plan, or a rival that is clearly better on the judging windows (module docstring)."""
    from tqdm.auto import tqdm

    looks = Looks.of(model, scores, batch_size)
    combos = [(rule.name, signal.name) for rule in ALLOCATIONS
              if rule.auto_candidate and (layout == "any" or rule.even_counts)
              for signal in REMOVAL_SIGNALS if signal.auto_candidate and signal.name in scores.removal]
    if DEFAULT_PLAN not in combos:
        raise FairMoeError(f"--allocation auto needs its default {'+'.join(DEFAULT_PLAN)} among the candidates")
    plans = [make_plan(scores, budget, a, r, protection, min_keep, base_model) for a, r in combos]
    default_index = combos.index(DEFAULT_PLAN)
    first = looks.first
    screen, rest = first.split(max(4, len(first) // 4)) if len(first) >= 8 else (first, None)

    def kl_on(part: DenseReference, i: int):
        return looks.plain_kl(part, plans[i].kept, lambda: window_kl(part, model, unit, plans[i].kept, None))

    bar = tqdm(total=len(combos) * 2, desc="judging candidate plans", disable=not progress)
    screened = []
    for i in range(len(plans)):
        screened.append(kl_on(screen, i))
        bar.update()
    racing = [i for i, kl in enumerate(screened)
              if i == default_index or not clearly_worse(kl, screened[default_index])]
    first_kls = {}
    for i in range(len(plans)):
        if i in racing:
            first_kls[i] = screened[i] if rest is None else looks.plain_kl(
                first, plans[i].kept, lambda i=i: torch.cat([screened[i], kl_on(rest, i)]))
        bar.update()
    bar.close()
    judged, windows, chosen, _ = judge_in_looks(kl_on, first_kls, default_index, looks)
    judged_rows = dict(zip(racing, judged, strict=True))
    rows = []
    for i, ((a, r), plan) in enumerate(zip(combos, plans, strict=True)):
        row = judged_rows.get(i) or _summary(screened[i], screened[default_index])
        rows.append({"allocation": a, "removal": r, "alpha": plan.alpha, "screened_out": i not in judged_rows,
                     "windows": windows.get(i, len(screen)), **row})
    best = plans[chosen]
    best.settings = {
        **best.settings,
        "allocation": AUTO,
        "selected": {"allocation": combos[chosen][0], "removal": combos[chosen][1], "compensation": "none",
                     "kl_mean": rows[chosen]["kl_mean"]},
        "selection": {"criterion": CRITERION, "rule": RULE, **looks.describe(),
                      "screening": f"on {len(screen)} windows first; dropped when worse than the default by more "
                                   f"than {Z:g} paired standard errors",
                      "looks": LOOKS, "default": "+".join(DEFAULT_PLAN)},
        "candidates": rows,
    }
    return Selection(best, looks)


def decide_compensation(model, unit: UnitKind, plan: PrunePlan, scores: Scores, kind: str,
                        batch_size: int = 4, seed: int = 0, options: tuple[str, ...] = (),
                        progress: bool = False, judge: Looks | None = None,
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
    judge = judge if judge is not None else Looks.of(model, scores, batch_size)
    candidates = [c for c in COMPENSATIONS if c.auto_candidate]
    left_out = {c.name: f"changes {c.writes}, which the output's quantized format cannot hold exactly"
                for c in candidates if writable is not None and c.writes not in writable}
    left_out.update({c.name: reason for c in candidates if c.name not in left_out and (reason := c.unavailable(model))})
    records = [None] + [fit(c) for c in candidates if c.name not in left_out]

    def kl_on(part: DenseReference, i: int):
        if records[i] is None:
            return judge.plain_kl(part, plan.kept, lambda: window_kl(part, model, unit, plan.kept, None))
        return window_kl(part, model, unit, plan.kept, records[i])

    first = {i: kl_on(judge.first, i) for i in range(len(records))}
    judged, windows, chosen, _ = judge_in_looks(kl_on, first, 0, judge)
    rows = [{"compensation": record.kind if record else "none", "windows": windows[i], **judged[i]}
            for i, record in enumerate(records)]
    plan.compensation = records[chosen]
    decision = {"criterion": CRITERION, "rule": COMPENSATION_RULE, "looks": LOOKS, "candidates": rows,
                **({"not_considered": left_out} if left_out else {})}
    selected = plan.settings.get("selected")
    plan.settings = {**plan.settings, "compensation_decision": decision,
                     **({"selected": {**selected, "compensation": rows[chosen]["compensation"]}} if selected else {})}
    return plan

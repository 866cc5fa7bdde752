"""One plan from saved scores: an allocation rule applied to a removal and a protection signal at a budget."""

from __future__ import annotations

from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.strategies.allocations import ALLOCATIONS
from fair_moe.strategies.signals import PROTECTION_SIGNALS, REMOVAL_SIGNALS


def make_plan(scores: Scores, budget: Budget, allocation: str, removal: str, protection: str = "taylor",
              min_keep: int | None = None, base_model: str | None = None) -> PrunePlan:
    """Allocate from saved scores. Budgets are exact: L × round(b·n) units removed."""
    layout = scores.layout
    rule = ALLOCATIONS.get(allocation)
    REMOVAL_SIGNALS.get(removal)
    PROTECTION_SIGNALS.get(protection)
    if budget.tolerance is not None and not rule.supports_tolerance:
        raise FairMoeError(f"--tolerance sets ToD's α directly: use it with --allocation "
                           f"{' / '.join(ALLOCATIONS.names(lambda r: r.supports_tolerance))}, or pass --budget")
    keep = layout.min_keep(min_keep)
    total = layout.total(budget, keep)
    if removal not in scores.removal:
        raise FairMoeError(
            f"--removal {removal} was not computed for these scores (have: {', '.join(sorted(scores.removal))}); "
            "wasserstein needs ≥ 2 calibration classes (--calib-file twice)"
        )
    n_max = [layout.max_removable(keep)] * layout.num_layers
    result = rule.allocate(scores.removal[removal], scores.protection, n_max, total, budget.tolerance, layout.groups)
    kept = {
        index: sorted(set(range(layout.width)) - set(removed))
        for index, removed in zip(scores.layer_indices, result.removed, strict=True)
    }
    return PrunePlan(
        model_type=scores.meta["model_type"],
        unit=layout.unit,
        width=layout.width,
        kept=kept,
        settings={
            "allocation": allocation,
            "removal": removal,
            "protection": protection,
            "budget": budget.fraction,
            "tolerance": budget.tolerance,
            "min_keep": keep,
            "groups": layout.groups,
            "calibration": scores.meta.get("calibration"),
        },
        alpha=result.alpha,
        base_model=base_model,
        top_k=layout.top_k,
        whole={index: layout.width for index in layout.whole},
    )

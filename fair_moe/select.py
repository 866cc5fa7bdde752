"""``--allocation auto``: build every candidate plan at the exact budget and keep the one whose masked
model has the lowest loss on calibration-source text that the scores were not computed from.

Candidates: ToD, uniform and global allocation with each removal signal the scores hold (random
excluded). Each is scored by the exact masked forward (removed experts unreachable, no rewrite), which
the test suite proves equal to the rewritten checkpoint, so the loss is the pruned model's own.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.errors import FairMoeError
from fair_moe.masking import masked_experts
from fair_moe.plan import PrunePlan
from fair_moe.scores import Scores
from fair_moe.signals.layerwise import execution_device

CANDIDATE_ALLOCATIONS = ("tod", "uniform", "global")
CANDIDATE_SIGNALS = ("reap", "frequency", "ean", "wasserstein")


@torch.no_grad()
def mean_loss(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``input_ids [n, seq]``."""
    device = execution_device(model)
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return total / count


def select_plan(model: nn.Module, scores: Scores, settings, base_model: str | None = None, batch_size: int = 4,
                progress: bool = True) -> PrunePlan:
    """The lowest-loss candidate plan; every candidate's loss is recorded in ``plan.settings["candidates"]``."""
    from fair_moe.pipeline import make_plan

    ids = scores.selection_ids
    if ids is None or len(ids) == 0:
        raise FairMoeError("--allocation auto needs calibration text the scores did not use, and none was left: "
                           "pass more calibration text, lower --samples, or pick --allocation tod|uniform|global")
    candidates: list[tuple[PrunePlan, float]] = []
    seen: dict[tuple, float] = {}
    combos = [(a, r) for a in CANDIDATE_ALLOCATIONS for r in CANDIDATE_SIGNALS if r in scores.removal]
    for allocation, removal in tqdm(combos, desc="scoring candidate plans", disable=not progress):
        plan = make_plan(scores, replace(settings, allocation=allocation, removal=removal), base_model=base_model)
        key = tuple(tuple(v) for _, v in sorted(plan.kept_experts.items()))
        if key not in seen:
            with masked_experts(model, plan.kept_experts):
                seen[key] = mean_loss(model, ids, batch_size)
        candidates.append((plan, seen[key]))
    best, best_loss = min(candidates, key=lambda c: c[1])  # min keeps the first of equal losses
    best.settings = {
        **best.settings,
        "allocation": "auto",
        "selected": {"allocation": best.settings["allocation"], "removal": best.settings["removal"]},
        "selection": {"windows": len(ids), "tokens": int(ids[:, 1:].numel()),
                      "dense_loss": mean_loss(model, ids, batch_size)},
        "candidates": [
            {"allocation": p.settings["allocation"], "removal": p.settings["removal"], "loss": loss,
             "perplexity": math.exp(loss), "alpha": p.alpha}
            for p, loss in candidates
        ],
    }
    return best

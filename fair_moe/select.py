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


FIT_WINDOWS = 32


def select_plan(model: nn.Module, scores: Scores, settings, base_model: str | None = None, batch_size: int = 4,
                progress: bool = True, compensation: str = "none") -> PrunePlan:
    """The lowest-loss candidate plan; every candidate's loss is recorded in ``plan.settings["candidates"]``.

    With ``compensation`` "layer-scale" every candidate is judged with its own layer scales (fitted on up to
    32 calibration windows); with "auto" each candidate is judged with and without them and the better
    of the two counts. The winner carries its compensation, and ``compensation_decided`` tells
    ``pipeline.compensate`` not to fit again.
    """
    from fair_moe.compensate import fit_layer_scales
    from fair_moe.pipeline import make_plan

    ids = scores.selection_ids
    if ids is None or len(ids) == 0:
        raise FairMoeError("--allocation auto needs calibration text the scores did not use, and none was left: "
                           "pass more calibration text, lower --samples, or pick --allocation tod|uniform|global")
    fit_ids = scores.calibration_subset(FIT_WINDOWS)
    use_scales = compensation in ("auto", "layer-scale") and fit_ids is not None and len(fit_ids) > 0
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}
    combos = [(a, r) for a in CANDIDATE_ALLOCATIONS for r in CANDIDATE_SIGNALS if r in scores.removal]
    for allocation, removal in tqdm(combos, desc="scoring candidate plans", disable=not progress):
        plan = make_plan(scores, replace(settings, allocation=allocation, removal=removal), base_model=base_model)
        key = tuple(tuple(v) for _, v in sorted(plan.kept_experts.items()))
        if key not in seen:
            result = {}
            if compensation != "layer-scale" or not use_scales:
                with masked_experts(model, plan.kept_experts):
                    result["loss"] = mean_loss(model, ids, batch_size)
            if use_scales:
                scales = fit_layer_scales(model, plan.kept_experts, fit_ids, batch_size)
                with masked_experts(model, plan.kept_experts, scales=scales):
                    result["loss_layer_scale"] = mean_loss(model, ids, batch_size)
                result["scales"] = scales
            seen[key] = result
        rows.append({"plan": plan, **seen[key]})

    def score(row: dict) -> tuple[float, bool]:
        options = [(row[k], k == "loss_layer_scale") for k in ("loss", "loss_layer_scale") if k in row]
        return min(options, key=lambda o: o[0])

    best_row = min(rows, key=lambda r: score(r)[0])  # min keeps the first of equal losses
    best, (best_loss, scaled) = best_row["plan"], score(best_row)
    if scaled:
        best.compensation = {"kind": "layer-scale", "scales": best_row["scales"], "fit_windows": len(fit_ids)}
    best.settings = {
        **best.settings,
        "allocation": "auto",
        "selected": {"allocation": best.settings["allocation"], "removal": best.settings["removal"],
                     "layer_scale": scaled, "loss": best_loss},
        "selection": {"windows": len(ids), "tokens": int(ids[:, 1:].numel()),
                      "dense_loss": mean_loss(model, ids, batch_size)},
        "compensation_decided": use_scales,
        "candidates": [
            {"allocation": r["plan"].settings["allocation"], "removal": r["plan"].settings["removal"],
             "alpha": r["plan"].alpha, **{k: r[k] for k in ("loss", "loss_layer_scale") if k in r},
             "perplexity": math.exp(score(r)[0])}
            for r in rows
        ],
    }
    return best

"""The Python API: calibrate → allocate → rewrite, each step usable on its own.

    from fair_moe import prune_model
    pruned, plan = prune_model(model, tokenizer, ["some text", ...], budget=0.25)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from fair_moe import allocate
from fair_moe.adapters import get_adapter
from fair_moe.calibration import CalibrationSource, make_calibration_split
from fair_moe.errors import FairMoeError
from fair_moe.plan import PrunePlan
from fair_moe.rewrite import apply_plan
from fair_moe.scores import Scores, model_fingerprint
from fair_moe.signals import REMOVAL_SIGNALS, run_calibration

log = logging.getLogger(__name__)
ALLOCATIONS = ("tod", "uniform", "global", "auto")
PROTECTIONS = ("taylor",)


@dataclass
class PlanSettings:
    """How a plan is chosen. Exactly one of ``budget`` (fraction of routed experts removed model-wide)
    and ``tolerance`` (the paper's α, ToD only) is set."""

    budget: float | None = 0.25
    tolerance: float | None = None
    allocation: str = "auto"
    removal: str = "reap"
    protection: str = "taylor"
    min_keep: int | None = None  # default: the router's top_k

    def validate(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise FairMoeError(f"--allocation {self.allocation!r} is unknown: use one of {', '.join(ALLOCATIONS)}")
        if self.removal not in REMOVAL_SIGNALS:
            raise FairMoeError(f"--removal {self.removal!r} is unknown: use one of {', '.join(REMOVAL_SIGNALS)}")
        if self.protection not in PROTECTIONS:
            raise FairMoeError(f"--protection {self.protection!r} is unknown: use one of {', '.join(PROTECTIONS)}")
        if (self.budget is None) == (self.tolerance is None):
            raise FairMoeError("pass exactly one of --budget and --tolerance")
        if self.budget is not None and not 0 < self.budget < 1:
            raise FairMoeError(f"--budget {self.budget} must be a fraction strictly between 0 and 1 (e.g. 0.25)")
        if self.tolerance is not None:
            if self.allocation != "tod":
                raise FairMoeError("--tolerance sets ToD's α directly: use it with --allocation tod, or pass --budget")
            if not 0 <= self.tolerance <= 1:
                raise FairMoeError(f"--tolerance {self.tolerance} must be in [0, 1]")


@dataclass
class ExpertLayout:
    """What a budget is checked against: E routed experts in each of ``num_layers`` MoE layers, top_k,
    and for group-limited routers G groups each keeping at least ``min_per_group`` experts."""

    num_experts: int
    top_k: int
    num_layers: int
    groups: int = 1
    min_per_group: int = 0

    @classmethod
    def from_config(cls, config, adapter, num_layers: int) -> ExpertLayout:
        return cls(adapter.num_experts(config), adapter.top_k(config), num_layers,
                   adapter.num_groups(config), adapter.min_kept_per_group(config))

    @classmethod
    def from_meta(cls, meta: dict, num_layers: int) -> ExpertLayout:
        return cls(int(meta["num_experts"]), int(meta["top_k"]), num_layers, int(meta.get("groups", 1)),
                   int(meta.get("min_per_group", 0)))

    def min_keep(self, settings: PlanSettings) -> int:
        return settings.min_keep if settings.min_keep is not None else self.top_k

    def max_removable(self, settings: PlanSettings) -> int:
        """Most experts one layer may lose: kept ≥ min_keep, every group keeps ≥ min_per_group, whole steps of G."""
        by_total = (self.num_experts - self.min_keep(settings)) // self.groups
        by_group = self.num_experts // self.groups - self.min_per_group
        return max(0, min(by_total, by_group)) * self.groups

    def removed_per_layer(self, budget: float) -> int:
        """round(b·E) with halves rounded up (0.5 × 7 removes 4); with G groups, G × round(b·E/G)."""
        return removed_per_layer(budget, self.num_experts, self.groups)


def removed_per_layer(budget: float, num_experts: int, groups: int = 1) -> int:
    return groups * int(math.floor(budget * num_experts / groups + 0.5))


def check_budget(settings: PlanSettings, layout: ExpertLayout) -> int:
    """Validate the budget against the model before any calibration; returns experts removed in total
    (-1 for a --tolerance run, whose total is not known in advance)."""
    settings.validate()
    min_keep = layout.min_keep(settings)
    if min_keep < layout.top_k:
        raise FairMoeError(f"--min-keep {min_keep} is below the router's top_k={layout.top_k}: every layer must keep ≥ top_k experts")
    if settings.budget is None:
        return -1
    e, per_layer = layout.num_experts, layout.removed_per_layer(settings.budget)
    grouped = f" (group-limited routing: {layout.groups} groups lose the same number each)" if layout.groups > 1 else ""
    if per_layer == 0:
        raise FairMoeError(f"--budget {settings.budget} removes 0 of {e} experts per layer{grouped}: raise --budget")
    if per_layer > layout.max_removable(settings):
        floor = max(min_keep, layout.groups * layout.min_per_group)
        raise FairMoeError(
            f"--budget {settings.budget} is too aggressive: it removes {per_layer} of {e} experts per layer{grouped}, "
            f"leaving {e - per_layer}, but the router selects top_k={layout.top_k} and a layer must keep at least {floor}; "
            f"use --budget ≤ {layout.max_removable(settings) / e:.4f}"
        )
    return per_layer * layout.num_layers


def compute_scores(
    model: nn.Module,
    tokenizer,
    sources: list[CalibrationSource],
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    selection_samples: int | None = None,
    layerwise: bool = False,
) -> Scores:
    """One calibration pass over ``sources``; every removal signal and the Taylor protection.

    ``selection_samples`` windows (default samples // 8, at least 4) of text the pass does not use are
    kept in the scores for ``--allocation auto`` to compare candidate plans on.
    """
    adapter = get_adapter(model.config)
    layers = adapter.moe_layers(model)
    if not layers:
        raise FairMoeError(f"the model ({model.config.model_type}) has no MoE layers to prune")
    if selection_samples is None:
        selection_samples = max(4, samples // 8)
    batches, selection_ids = make_calibration_split(tokenizer, sources, samples, seq_len, batch_size, seed, selection_samples)
    if layerwise:  # activation memory of one decoder layer; works with accelerate-offloaded weights
        from fair_moe.signals.layerwise import run_calibration_layerwise

        removal, protection, tokens = run_calibration_layerwise(model, layers, batches, len(sources), seed, progress)
    else:
        removal, protection, tokens = run_calibration(model, layers, batches, len(sources), seed, progress)
    meta = {
        "model_type": model.config.model_type,
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "groups": layers[0].groups,
        "min_per_group": adapter.min_kept_per_group(model.config),
        "fingerprint": model_fingerprint(model.config, {k: tuple(v.shape) for k, v in model.state_dict().items()}),
        "calibration": {
            "sources": [s.name for s in sources],
            "samples": sum(len(b) for _, b in batches),
            "seq_len": seq_len,
            "tokens": tokens,
            "seed": seed,
        },
    }
    calibration_ids = torch.cat([b for _, b in batches]) if batches else None
    scores = Scores([layer.index for layer in layers], removal, protection, meta, selection_ids, calibration_ids)
    scores.check_finite()
    return scores


def make_plan(scores: Scores, settings: PlanSettings, base_model: str | None = None) -> PrunePlan:
    """Allocate from saved scores. Budgets are exact: L × round(b·E) experts removed."""
    layout = ExpertLayout.from_meta(scores.meta, len(scores.layer_indices))
    num_experts, top_k, num_layers, groups = layout.num_experts, layout.top_k, layout.num_layers, layout.groups
    total = check_budget(settings, layout)
    if settings.removal not in scores.removal:
        raise FairMoeError(
            f"--removal {settings.removal} was not computed for these scores "
            f"(have: {', '.join(sorted(scores.removal))}); wasserstein needs ≥ 2 calibration sources (--calib-file twice)"
        )
    if settings.allocation == "auto":
        raise FairMoeError("--allocation auto compares candidate plans on the model: use fair_moe.select.select_plan")
    u = scores.removal[settings.removal]
    r = scores.protection
    min_keep = layout.min_keep(settings)
    n_max = [layout.max_removable(settings)] * num_layers
    if settings.allocation == "uniform":
        result = allocate.uniform(u, total // num_layers, groups)
    elif settings.allocation == "global":
        result = allocate.global_(u, n_max, total, groups)
    elif settings.budget is not None:
        result = allocate.tod(u, r, n_max, total=total, groups=groups)
    else:
        result = allocate.tod(u, r, n_max, alpha=settings.tolerance, groups=groups)
    kept = {
        index: sorted(set(range(num_experts)) - set(removed))
        for index, removed in zip(scores.layer_indices, result.removed, strict=True)
    }
    return PrunePlan(
        model_type=scores.meta["model_type"],
        num_experts=num_experts,
        top_k=top_k,
        kept_experts=kept,
        settings={
            "allocation": settings.allocation,
            "removal": settings.removal,
            "protection": settings.protection,
            "budget": settings.budget,
            "tolerance": settings.tolerance,
            "min_keep": min_keep,
            "groups": groups,
            "calibration": scores.meta.get("calibration"),
        },
        alpha=result.alpha,
        base_model=base_model,
    )


def compensate(model: nn.Module, plan: PrunePlan, scores: Scores, kind: str, batch_size: int = 4) -> PrunePlan:
    """Fit the chosen compensation on the calibration windows and record it in the plan (weights untouched:
    ``apply_plan`` folds it in). ``auto`` keeps ``layer-scale`` only if it lowers the loss on the
    selection windows, which the fit never sees."""
    from fair_moe.compensate import COMPENSATIONS, fit_layer_scales, fit_merges, fit_router_temperatures

    if kind not in (*COMPENSATIONS, "auto"):
        raise FairMoeError(f"--compensate {kind!r} is unknown: use one of auto, {', '.join(COMPENSATIONS)}")
    if kind == "none" or plan.settings.get("compensation_decided"):
        return plan
    ids = scores.calibration_subset(64)
    if ids is None:
        raise FairMoeError("--compensate needs the calibration windows, which this scores file lacks: "
                           "calibrate again or pass --compensate none")
    if kind == "merge":
        plan.compensation = {"kind": "merge", "merges": fit_merges(model, plan.kept_experts, ids, batch_size),
                             "fit_windows": len(ids)}
        return plan
    if kind == "router-temperature":
        temperatures = fit_router_temperatures(model, plan.kept_experts, ids, batch_size)
        plan.compensation = {"kind": "router-temperature", "temperatures": temperatures, "fit_windows": len(ids)}
        return plan
    scales = fit_layer_scales(model, plan.kept_experts, ids, batch_size)
    record = {"kind": "layer-scale", "scales": scales, "fit_windows": len(ids)}
    if kind == "auto":
        from fair_moe.masking import masked_experts
        from fair_moe.select import mean_loss

        held = scores.selection_ids
        if held is None or len(held) == 0:
            return plan
        with masked_experts(model, plan.kept_experts):
            plain = mean_loss(model, held, batch_size)
        with masked_experts(model, plan.kept_experts, scales=scales):
            scaled = mean_loss(model, held, batch_size)
        record.update(selection_loss_without=plain, selection_loss_with=scaled)
        if scaled >= plain:
            plan.settings = {**plan.settings, "compensation_rejected": record}
            return plan
    plan.compensation = record
    return plan


def prune_model(
    model: nn.Module,
    tokenizer,
    calibration: list[str] | list[CalibrationSource] | Scores,
    budget: float | None = 0.25,
    *,
    tolerance: float | None = None,
    allocation: str = "auto",
    removal: str = "reap",
    compensation: str = "auto",
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, PrunePlan]:
    """Calibrate (unless given Scores), allocate and slice ``model`` in place.

    ``calibration`` is a list of texts (one class), a list of CalibrationSource (one class each),
    or the Scores of an earlier run. Returns the pruned model and its plan.
    """
    settings = PlanSettings(budget=budget if tolerance is None else None, tolerance=tolerance, allocation=allocation, removal=removal)
    adapter = get_adapter(model.config)
    check_budget(settings, ExpertLayout.from_config(model.config, adapter, 1))
    if isinstance(calibration, Scores):
        scores = calibration
    else:
        sources = calibration
        if sources and isinstance(sources[0], str):
            sources = [CalibrationSource("texts", list(calibration))]
        scores = compute_scores(model, tokenizer, sources, samples, seq_len, batch_size, seed, progress)
    base = getattr(model.config, "_name_or_path", None) or None
    if allocation == "auto":
        from fair_moe.select import select_plan

        plan = select_plan(model, scores, settings, base_model=base, progress=progress, compensation=compensation)
    else:
        plan = make_plan(scores, settings, base_model=base)
    plan = compensate(model, plan, scores, compensation, batch_size)
    with torch.no_grad():
        apply_plan(model, plan)
    return model, plan

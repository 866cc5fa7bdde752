"""fair_moe: prune whole routed experts of Hugging Face MoE models with Tolerance-of-Difference allocation.

The public API (``prune_model``, ``compute_scores``, ``make_plan``, ``apply_plan``, ``reference``, …) is
imported on first use, so that ``import fair_moe`` and the command line's ``--help`` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "PlanSettings": "fair_moe.workflow.api",
    "apply_plan": "fair_moe.workflow.api",
    "compute_scores": "fair_moe.workflow.api",
    "make_plan": "fair_moe.workflow.api",
    "prune_model": "fair_moe.workflow.api",
    "reference": "fair_moe.workflow.api",
    "save_pruned": "fair_moe.workflow.api",
    "stream_pruned": "fair_moe.workflow.api",
    "Budget": "fair_moe.core.budget",
    "FairMoeError": "fair_moe.core.errors",
    "CompensationRecord": "fair_moe.core.plan",
    "PrunePlan": "fair_moe.core.plan",
    "Scores": "fair_moe.core.scores",
    "PruneSettings": "fair_moe.workflow.settings",
    "run_prune": "fair_moe.workflow.prune",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fair_moe' has no attribute {name!r}")

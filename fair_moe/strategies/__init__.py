"""Strategies, each registered once under its CLI name: removal / protection signals, allocation rules,
compensations; plus the planning step and ``auto``'s selection (``selection.py``) that combine them."""

from fair_moe.strategies.allocations import ALLOCATIONS
from fair_moe.strategies.compensations import COMPENSATIONS
from fair_moe.strategies.signals import PROTECTION_SIGNALS, REMOVAL_SIGNALS

AUTO = "auto"  # the model-judged choice, accepted by --allocation and --compensate
AUTO_ALLOCATION_HELP = ("the best of every allocation rule × removal signal, judged by the masked model's loss on "
                        "calibration text the scores did not use")
AUTO_COMPENSATION_HELP = "fit each auto-candidate compensation and keep it only if it lowers that held-out loss"
LAYOUTS = {  # --layout: which plans are allowed
    "any": "layers may keep different counts (loads with trust_remote_code=True; not in vLLM / SGLang / TGI)",
    "stock": "every layer keeps the same count, so the checkpoint is the stock architecture (serving engines)",
}

__all__ = ["ALLOCATIONS", "AUTO", "LAYOUTS", "AUTO_ALLOCATION_HELP", "AUTO_COMPENSATION_HELP", "COMPENSATIONS",
           "PROTECTION_SIGNALS", "REMOVAL_SIGNALS"]

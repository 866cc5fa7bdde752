"""Strategies, each registered once under its CLI name: removal / protection signals, allocation rules,
compensations; plus the planning step and ``auto``'s selection (``selection.py``) that combine them."""

from fair_moe.strategies.allocations import ALLOCATIONS
from fair_moe.strategies.compensations import COMPENSATIONS
from fair_moe.strategies.signals import PROTECTION_SIGNALS, REMOVAL_SIGNALS

AUTO = "auto"  # the model-judged choice, accepted by --allocation and --compensate
AUTO_ALLOCATION_HELP = ("uniform + ean unless another allocation rule × removal signal beats it clearly: every "
                        "candidate is judged by the KL divergence of the masked model's next-token distribution from "
                        "the dense model's on calibration text the scores did not use, paired window by window; a "
                        "rival replaces the default only with a mean gain above 2 standard errors, or above 1 when "
                        "it is lower on clearly more windows than higher (sign test)")
AUTO_COMPENSATION_HELP = ("fit each compensation marked as an auto candidate and keep one only if it clearly beats "
                          "none on the same paired KL")
LAYOUTS = {  # --layout: which plans are allowed
    "any": "layers may keep different counts (loads with trust_remote_code=True; not in vLLM / SGLang / TGI)",
    "stock": "every layer keeps the same count, so the checkpoint is the stock architecture (serving engines)",
}

__all__ = ["ALLOCATIONS", "AUTO", "LAYOUTS", "AUTO_ALLOCATION_HELP", "AUTO_COMPENSATION_HELP", "COMPENSATIONS",
           "PROTECTION_SIGNALS", "REMOVAL_SIGNALS"]

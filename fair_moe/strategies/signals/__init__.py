"""Removal and protection signals; every module here registers one signal.

Modules are imported in a fixed order: it is the order of ``--removal``'s choices and the order in
which ``--allocation auto`` tries candidates (the first of equal losses wins).
"""

from importlib import import_module

from fair_moe.strategies.signals.base import (
    PROTECTION_SIGNALS,
    REMOVAL_SIGNALS,
    ProtectionSignal,
    RemovalSignal,
    compute_signals,
)

for _module in ("reap", "frequency", "ean", "wasserstein", "consensus", "random", "taylor"):
    import_module(f"{__name__}.{_module}")

__all__ = ["PROTECTION_SIGNALS", "REMOVAL_SIGNALS", "ProtectionSignal", "RemovalSignal", "compute_signals"]

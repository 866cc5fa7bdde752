"""Compensations; every module here registers one. Import order = ``--compensate`` choices."""

from importlib import import_module

from fair_moe.strategies.compensations.base import (
    COMPENSATIONS,
    Compensation,
    FitData,
    forward_all,
    options_for,
)

for _module in ("none", "layer_scale", "router_temperature", "merge", "router_kd"):
    import_module(f"{__name__}.{_module}")

__all__ = ["COMPENSATIONS", "Compensation", "FitData", "forward_all", "options_for"]

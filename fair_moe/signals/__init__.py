"""Removal and protection signals, collected in one calibration pass."""

from fair_moe.signals.collect import REMOVAL_SIGNALS, run_calibration
from fair_moe.signals.wasserstein import max_pairwise_wasserstein, wasserstein_1d

__all__ = ["REMOVAL_SIGNALS", "max_pairwise_wasserstein", "run_calibration", "wasserstein_1d"]

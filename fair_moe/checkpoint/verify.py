"""The write-time check: the checkpoint on disk, reloaded, must give the reference's outputs."""

from __future__ import annotations

import logging

import torch

from fair_moe.core.errors import FairMoeError

log = logging.getLogger(__name__)


def compare_outputs(reloaded: torch.Tensor, reference: torch.Tensor, exact: bool, exact_tolerance: float,
                    what: str) -> float:
    """Max |Δ| between the reloaded checkpoint's outputs and the reference's; a FairMoeError when too large.

    ``exact`` (computed and saved in float32) allows ``exact_tolerance``; a narrower dtype rounds weights that
    a compensation rescaled, so the tolerance then follows the saved precision (2 % of the largest output).
    """
    diff = (reloaded.float().cpu() - reference.float().cpu()).abs().max().item()
    tolerance = exact_tolerance if exact else 2e-2 * max(1.0, reference.abs().max().item())
    if not diff <= tolerance:
        hint = "" if exact else (
            " (in half precision two kept experts can tie exactly at the top-k boundary, and torch.topk may break the "
            "tie differently in the sliced checkpoint than in the masked original: rerun with --dtype float32 to "
            "verify, or pass --no-verify)")
        raise FairMoeError(f"the written checkpoint does not match {what} (max |Δ| = {diff:.3g} > {tolerance:.3g}); "
                           f"nothing was written to --out{hint}")
    log.info("verified: the reloaded checkpoint matches %s (max |Δ| = %.2e)", what, diff)
    return diff

"""The write-time check: the checkpoint on disk, reloaded, must give the reference's outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fair_moe.core.errors import FairMoeError

log = logging.getLogger(__name__)


def half_precision_tolerance(largest: float) -> float:
    """The largest |Δ| a half-precision round trip may show: 2 % of the largest value compared (at least 1)."""
    return 2e-2 * max(1.0, largest)


def compare_outputs(reloaded: torch.Tensor, reference: torch.Tensor, exact: bool, exact_tolerance: float,
                    what: str) -> float:
    """Max |Δ| between the reloaded checkpoint's outputs and the reference's; a FairMoeError when too large.

    ``exact`` (computed and saved in float32) allows ``exact_tolerance``; a narrower dtype rounds weights that
    a compensation rescaled, so the tolerance then follows the saved precision (2 % of the largest output).
    """
    diff = (reloaded.float().cpu() - reference.float().cpu()).abs().max().item()
    tolerance = exact_tolerance if exact else half_precision_tolerance(reference.abs().max().item())
    if not diff <= tolerance:
        hint = "" if exact else (
            " (in half precision two kept experts can tie exactly at the top-k boundary, and torch.topk may break the "
            "tie differently in the sliced checkpoint than in the masked original: rerun with --dtype float32 to "
            "verify, or pass --no-verify)")
        raise FairMoeError(f"the written checkpoint does not match {what} (max |Δ| = {diff:.3g} > {tolerance:.3g}); "
                           f"nothing was written to --out{hint}")
    log.info("verified: the reloaded checkpoint matches %s (max |Δ| = %.2e)", what, diff)
    return diff


@dataclass
class ByParts:
    """A half-precision check that router ties cannot fail (``units/experts/trace.py``): ``outputs`` of the
    reloaded checkpoint run with the original's routing decisions; ``router_delta`` the largest |Δ| between its
    routers' scores and the original's on the kept experts (``router_scale`` the original's largest |score|), None
    when the routers computed different tensors; ``differing`` of ``decisions`` token decisions chose other
    experts on their own, ``unexplained`` of them where the original's scores are further apart than the measured
    score difference allows (not a tie or near-tie)."""

    outputs: torch.Tensor
    router_delta: float | None
    router_scale: float
    differing: int
    decisions: int
    unexplained: int


def compare_by_parts(parts: ByParts, reference: torch.Tensor, what: str, plain_error: FairMoeError) -> float:
    """Accept a checkpoint whose plain comparison failed (``plain_error``) when both parts match within the
    half-precision tolerance (2 % of the largest value): its routers' scores, and its outputs under the original's
    routing, and every routing decision of its own that differs is a tie or near-tie of the original's scores.
    Else ``plain_error``, told what the parts showed. Returns the outputs' max |Δ|."""
    router_tolerance = half_precision_tolerance(parts.router_scale)
    router_ok = parts.router_delta is not None and parts.router_delta <= router_tolerance
    diff = (parts.outputs.float().cpu() - reference.float().cpu()).abs().max().item()
    tolerance = half_precision_tolerance(reference.abs().max().item())
    if not (router_ok and diff <= tolerance and parts.unexplained == 0):
        router = ("the routers computed different tensors" if parts.router_delta is None else
                  f"router scores max |Δ| = {parts.router_delta:.3g} (tolerance {router_tolerance:.3g})")
        raise FairMoeError(f"{plain_error} [checked by parts: {router}; {parts.unexplained} of {parts.differing} "
                           f"differing routing decisions are not ties; outputs under the original's routing max "
                           f"|Δ| = {diff:.3g} (tolerance {tolerance:.3g})]") from plain_error
    log.info("verified by parts: %d of %d token routing decisions differ at (near-)tied router scores in half "
             "precision; the routers' scores match %s (max |Δ| = %.2e) and, with its routing, so do the outputs "
             "(max |Δ| = %.2e)", parts.differing, parts.decisions, what, parts.router_delta, diff)
    return diff

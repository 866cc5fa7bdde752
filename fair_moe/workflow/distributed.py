"""Data-parallel calibration over ``torch.distributed`` (``torchrun --nproc-per-node N -m fair_moe.prune …``).

Every signal is a sum over calibration tokens (frequency, ean, reap's sums, Taylor) or a pool of per-token values
(the class distributions of wasserstein), so the calibration batches split cleanly: every rank builds the same
batches (same data, same seed), runs its own share (``batches[rank::world]``) on its own copy of the model (or its
own ``--device-map`` slice of GPUs), and rank 0 gathers the statistics, merges them (``SignalStatistics.merge``)
and alone selects, compensates and writes. gloo on CPU, NCCL on GPUs.

A rank that fails says so in one ``error:`` line and exits; torchrun then stops the others (SIGTERM: they clean
up and say so in one line), and rank 0, which alone claims ``--out``, leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fair_moe.core.errors import FairMoeError
from fair_moe.core.statistics import SignalStatistics


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batches: list) -> list:
        """This rank's calibration batches: every ``world``-th one, starting at ``rank``."""
        return batches[self.rank :: self.world]


def from_environment(device: str = "cpu") -> Ranks | None:
    """The group torchrun / accelerate launched this process into (None when run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as err:
            raise FairMoeError(f"cannot join the torch.distributed group ({err}): launch with torchrun "
                               "--nproc-per-node N -m fair_moe.prune …") from err
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks(dist.get_rank(), dist.get_world_size())


def gather_statistics(stats: SignalStatistics, ranks: Ranks) -> SignalStatistics | None:
    """Every rank's statistics, merged on rank 0 (None on the other ranks). The group is left afterwards: only
    rank 0 has work left, and it needs no other rank for it."""
    import torch.distributed as dist

    parts = [None] * ranks.world if ranks.main else None
    try:
        dist.gather_object(_to_cpu(stats), parts, dst=0)
    except RuntimeError as err:  # gloo / NCCL: a peer went away
        raise FairMoeError("the group broke off while gathering the calibration statistics: another rank failed "
                           "(its own error line says why); nothing was written") from err
    dist.destroy_process_group()
    return SignalStatistics.merge(parts) if ranks.main else None


def _to_cpu(stats: SignalStatistics) -> SignalStatistics:
    for name in ("taylor", "count", "output_norm", "gated_norm"):
        value = getattr(stats, name)
        if value is not None:
            setattr(stats, name, value.cpu())
    return stats

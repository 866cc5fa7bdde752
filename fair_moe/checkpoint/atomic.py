"""Output folders that appear whole or not at all, and a source that is never touched.

A run claims ``--out`` for its whole duration: it creates a container beside it,
``.<name>.fair_moe-partial-<pid>/``, holding a lock file (``flock``, released by the kernel on any exit,
SIGKILL included) and the checkpoint being written (``checkpoint/``). Only when everything was written and
verified is ``checkpoint/`` renamed to ``--out`` (an existing ``--out`` being replaced is first moved into
the container) and the container removed. So:

- a failure or a SIGINT / SIGTERM removes the container at once and leaves ``--out`` as it was;
- a SIGKILL leaves at most the container, whose name says it is fair_moe's and incomplete; the next run into
  the same ``--out`` finds its lock free, removes it (first putting back an ``--out`` that was mid-replace)
  and goes on;
- a second run into the same ``--out`` while the first holds the lock is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PLAN_FILE

PARTIAL = "fair_moe-partial"
LOCK_FILE = "lock"
_ACTIVE: set[OutputClaim] = set()  # claims of this process, removed at once by ``abort_claims`` on a signal


def written_by_fair_moe(folder: Path) -> bool:
    """A folder fair_moe wrote: it holds a plan, or only ``budget-*`` / ``tolerance-*`` folders that each hold one."""
    folder = Path(folder)
    if (folder / PLAN_FILE).is_file():
        return True
    entries = list(folder.iterdir())
    return bool(entries) and all(
        e.is_dir() and e.name.startswith(("budget-", "tolerance-")) and (e / PLAN_FILE).is_file() for e in entries)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """An existing non-empty --out is an error unless --overwrite, and --overwrite only replaces a folder that
    fair_moe wrote (or an empty one)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FairMoeError(f"--out {out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FairMoeError(f"--out {out} exists and is not empty: choose another --out or pass --overwrite")
        if not written_by_fair_moe(out):
            raise FairMoeError(f"--out {out} was not written by fair_moe (it has no {PLAN_FILE}): --overwrite only "
                               "replaces fair_moe's own output folders; choose another --out")


def check_apart(source: Path, target: Path, flag: str) -> None:
    """``target`` (where a flag writes) must not be the source folder, lie inside it, or contain it."""
    src, dst = Path(source).resolve(), Path(target).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        relation = "is" if src == dst else ("lies inside" if src in dst.parents else "contains")
        raise FairMoeError(f"{flag} {target} {relation} the source model {source}: fair_moe never writes into the "
                           f"model it reads; choose a {flag} outside it")


def _containers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{PARTIAL}-*")) if out.parent.is_dir() else []


def _try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on ``path``: the open descriptor, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


class OutputClaim:
    """``--out`` claimed for one run (see the module docstring); a context manager."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.container = self.out.parent / f".{self.out.name}.{PARTIAL}-{os.getpid()}"
        self._fd: int | None = None

    @property
    def staging(self) -> Path:
        """Where the checkpoint is written before it is moved to ``--out``."""
        return self.container / "checkpoint"

    def __enter__(self) -> OutputClaim:
        check_output_dir(self.out, self.overwrite)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for other in _containers(self.out):
                self._clear_stale(other)
            self.container.mkdir()
            _ACTIVE.add(self)
            self._fd = _try_lock(self.container / LOCK_FILE)
        except OSError as err:
            self._remove()
            raise FairMoeError(f"cannot prepare --out {self.out}: {err.strerror or err} ({err.filename or self.out}); "
                               "check the folder's permissions or choose another --out") from err
        return self

    def _clear_stale(self, other: Path) -> None:
        lock = other / LOCK_FILE
        fd = _try_lock(lock) if lock.exists() else None
        if lock.exists() and fd is None:
            raise FairMoeError(f"another fair_moe run is writing --out {self.out} (it holds {other.name}): wait for it "
                               "or choose another --out")
        try:
            old = other / "old"
            if old.is_dir() and not self.out.exists():  # killed mid-replace: the previous output comes back
                old.rename(self.out)
            shutil.rmtree(other, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)

    def commit(self) -> None:
        """Move the written checkpoint to ``--out`` (replacing a previous fair_moe output)."""
        if self.out.exists():
            check_output_dir(self.out, self.overwrite)  # it may have changed while we worked
            self.out.rename(self.container / "old")
        self.staging.rename(self.out)

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        _ACTIVE.discard(self)
        shutil.rmtree(self.container, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def abort_claims() -> None:
    """Remove every container this process holds (on SIGINT / SIGTERM, before exiting at once)."""
    for claim in list(_ACTIVE):
        claim._remove()


def write_atomically(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Call ``write(folder)`` on a staging folder beside ``out``, then move it to ``out`` only if it succeeded.

    On any error nothing at ``out`` is created or changed and nothing is left beside it. Disk faults (no space,
    permissions) become one FairMoeError naming what failed and where.
    """
    with OutputClaim(out, overwrite) as claim:
        claim.staging.mkdir()
        try:
            write(claim.staging)
            claim.commit()
        except OSError as err:
            raise FairMoeError(f"writing --out {claim.out} failed: {err.strerror or err} "
                               f"({err.filename or claim.staging}); nothing was written") from err

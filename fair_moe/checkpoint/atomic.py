"""Output folders that appear whole or not at all.

Everything is written into a temporary sibling folder that is renamed into place only when the whole
write succeeded; on any error nothing at ``--out`` is created or changed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from fair_moe.core.errors import FairMoeError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """An existing non-empty --out is an error unless --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FairMoeError(f"--out {out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FairMoeError(f"--out {out} exists and is not empty: choose another --out or pass --overwrite")


@contextlib.contextmanager
def _temporary_sibling(out: Path, tag: str) -> Iterator[Path]:
    tmp = out.parent / f".{out.name}.{tag}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomically(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary sibling folder, then move it to ``out`` only if it succeeded."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_sibling(out, "fair_moe-partial") as tmp:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.fair_moe-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)

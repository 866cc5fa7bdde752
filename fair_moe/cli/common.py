"""What every command shares: a FairMoeError becomes one ``error:`` line and exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from fair_moe.core.errors import FairMoeError


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (it may be replaced between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def run_command(run: Callable[[], object]) -> int:
    """Run a command's body: 0 on success; a FairMoeError becomes one ``error:`` line on stderr and exit 2.

    fair_moe's own log lines go to stderr; no other library's logging is configured."""
    logger = logging.getLogger("fair_moe")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run()
    except FairMoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

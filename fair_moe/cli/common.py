"""What every command shares: a FairMoeError becomes one ``error:`` line and exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from fair_moe.core.errors import FairMoeError


def run_command(run: Callable[[], object]) -> int:
    """Run a command's body: 0 on success; a FairMoeError becomes one ``error:`` line on stderr and exit 2."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("fair_moe")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run()
    except FairMoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

"""What every command shares: a FairMoeError becomes one ``error:`` line and exit status 2."""

from __future__ import annotations

import logging
import signal
import sys
import threading
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


class Interrupted(BaseException):
    """SIGTERM, raised where the program is, so that every clean-up (temporary folders, locks) runs."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_command(run: Callable[[], object]) -> int:
    """Run a command's body: 0 on success; a FairMoeError becomes one ``error:`` line on stderr and exit 2;
    SIGINT / SIGTERM clean up (nothing half-written stays) and exit 130 / 143 with one line.

    fair_moe's own log lines go to stderr; no other library's logging is configured."""
    logger = logging.getLogger("fair_moe")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        run()
    except FairMoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as err:
        name = str(err) or "SIGINT"
        print(f"error: interrupted by {name}; nothing half-written was left behind", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0

"""What every command shares: a FairMoeError becomes one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable

from fair_moe.core.errors import FairMoeError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default after its help (unless the help states it)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], (), argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {default})"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (it may be replaced between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _interrupt(signum, frame) -> None:
    """SIGINT / SIGTERM: remove what this run has half-written, say so in one line and exit at once.

    Exiting from the handler (rather than raising into whatever the program was doing) works even when the
    signal lands inside a finaliser or a C call, where an exception would be swallowed or half-handled."""
    import os

    from fair_moe.checkpoint.atomic import abort_claims

    abort_claims()
    name = signal.Signals(signum).name
    sys.stdout.flush()
    # a progress bar may have left the cursor mid-line: the message starts a line of its own
    print(f"\nerror: {_rank_prefix()}interrupted by {name}; nothing half-written was left behind", file=sys.stderr,
          flush=True)
    os._exit(128 + signum)


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True):
    """--quiet: no progress bars or notices from transformers and huggingface_hub, and fair_moe's own log only for
    errors, for the duration of the block; what is left on the console is errors and the final path."""
    if not quiet:
        yield
        return
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("fair_moe")
    level, verbosity = logger.level, transformers.utils.logging.get_verbosity()
    bars, hub_bars = transformers.utils.logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


def set_threads(count: int) -> None:
    """Let torch use ``count`` CPU threads for its intra-op parallel work (``--threads``)."""
    if count < 1:
        raise FairMoeError(f"--threads must be at least 1, got {count}")
    import torch

    torch.set_num_threads(count)


def _rank_prefix() -> str:
    """``rank R of N: `` inside a torch.distributed launch, else nothing."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '?')} of {world}: " if world > 1 else ""


def run_command(run: Callable[[], object]) -> int:
    """Run a command's body: 0 on success; a FairMoeError becomes one ``error:`` line on stderr and exit 2 (or the
    error's own ``exit_code``); SIGINT / SIGTERM clean up (nothing half-written stays) and exit 130 / 143 with one
    line.

    fair_moe's own log lines go to stderr; no other library's logging is configured."""
    logger = logging.getLogger("fair_moe")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        run()
    except FairMoeError as err:
        print(f"error: {_rank_prefix()}{err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except Exception as err:
        if not _rank_prefix():
            raise  # a bug: its traceback is what a report needs
        # one rank of a torch.distributed group: one line, then torchrun stops the others (they clean up)
        print(f"error: {_rank_prefix()}{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}",
              file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

"""The one exception type the command line turns into a clean message (no traceback)."""


class FairMoeError(Exception):
    """A problem with the user's input: the message names what was wrong and which flag to change."""


def run_command(run, args) -> int:
    """Run a command's body: 0 on success; a FairMoeError becomes one ``error:`` line on stderr and exit 2."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run(args)
    except FairMoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

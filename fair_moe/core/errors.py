"""The one exception type the command line turns into a clean message (no traceback)."""


class FairMoeError(Exception):
    """A problem with the user's input: the message names what was wrong and which flag to change."""

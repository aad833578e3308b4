"""The one exception type for user errors (bad path, bad name, bad shape).

The CLI turns it into one sentence and exit code 2; anything else is a bug and keeps its traceback.
"""


class FmktError(Exception):
    """A user-facing error: the message is one clear sentence saying what is wrong and what to do."""

"""The one exception type for user errors (bad path, bad name, bad shape).

The CLI turns it into one sentence and exit code 2; anything else is a bug and keeps its traceback.
"""


class FmktError(Exception):
    """A user-facing error: the message is one clear sentence saying what is wrong and what to do."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``"TypeName: the first line of its message"`` (at most ``limit`` characters of it), for one-line reports."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:limit]}"

"""The one exception type for user errors (bad path, bad name, bad shape).

The CLI turns it into one sentence and exit code 2; anything else is a bug and keeps its traceback.
"""


class FmktError(Exception):
    """A user-facing error: the message is one clear sentence saying what is wrong and what to do."""


def first_line(exc: BaseException, limit: int | None = 160, *, with_type: bool = True) -> str:
    """The one helper for "an exception in one line": ``"TypeName: the first line of its message"`` (at most
    ``limit`` characters of that line; None: all of it), or ``"TypeName"`` when the message is empty. With
    ``with_type=False``, the line alone (``""`` when the message is empty)."""
    lines = str(exc).strip().splitlines()
    line = lines[0][:limit] if lines else ""
    if not with_type:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__

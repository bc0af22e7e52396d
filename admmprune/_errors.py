"""Errors a user can cause, and how command-line entry points report them."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure caused by the user's input or environment, not by a bug.

    Command-line entry points print its message on one line and exit with
    status 2, without a traceback. Library callers can catch it like any
    exception. The message must say what was wrong and what to do instead.
    """


def run_cli(body: Callable[[], None], *, interrupted: str) -> int:
    """Runs a command-line entry point's ``body`` and returns its exit status.

    0 when it returns; 2 after one ``error: ...`` line on stderr for a
    :class:`UserError`; 130 after ``interrupted`` on stderr for Ctrl-C. Any
    other exception is a bug and propagates with its traceback.
    """
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0

"""Errors a user can cause."""


class UserError(Exception):
    """A failure caused by the user's input or environment, not by a bug.

    Command-line entry points print its message on one line and exit with
    status 2, without a traceback. Library callers can catch it like any
    exception. The message must say what was wrong and what to do instead.
    """

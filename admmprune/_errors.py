"""Errors a user can cause, and how command-line entry points report them."""

import errno
import sys
from collections.abc import Callable

# The exit status of a run stopped by SIGTERM after saving its state: 128 + 15,
# what a shell reports for a process that SIGTERM ended, so that a scheduler's
# requeue rules (SLURM, Kubernetes, a batch script's `if [ $? = 143 ]`) treat it
# as preempted, not as failed (2) or complete (0).
PREEMPTED_EXIT = 143

# What the operating system says when the user's environment refuses a file
# operation (a full disk, a read-only mount, no permission, a path through a
# file): not a bug, so one line and exit status 2, like a UserError.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)


class UserError(Exception):
    """A failure caused by the user's input or environment, not by a bug.

    Command-line entry points print its message on one line and exit with
    status 2, without a traceback. Library callers can catch it like any
    exception. The message must say what was wrong and what to do instead.
    """


class Preempted(Exception):
    """A run stopped on request (SIGTERM) after saving a checkpoint.

    Command-line entry points print its message on one line and exit with
    status :data:`PREEMPTED_EXIT` (143). The message says where the state is
    and that rerunning the same command resumes.
    """


def run_cli(body: Callable[[], None], *, interrupted: str) -> int:
    """Runs a command-line entry point's ``body`` and returns its exit status.

    0 when it returns; 2 after one ``error: ...`` line on stderr for a
    :class:`UserError`, or for an ``OSError`` the environment caused (a full
    disk, a read-only file system, no permission: see
    :data:`ENVIRONMENT_ERRNOS`); 143 after its message for :class:`Preempted`;
    130 after ``interrupted`` on stderr for Ctrl-C. Any other exception is a
    bug and propagates with its traceback.
    """
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(e, file=sys.stderr)
        return PREEMPTED_EXIT
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror}{where}; free space or fix the path or its permissions, and rerun", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0

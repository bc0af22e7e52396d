"""Preemption: SIGTERM asks a run to save a checkpoint at the next step and stop.

A cluster scheduler (SLURM, Kubernetes, a TPU VM's maintenance event) sends
SIGTERM some seconds before it kills a job. While the phases train, the
handler only sets a flag; the training loop looks at it at every step
boundary, saves a checkpoint there with the data iterator's position, and
raises ``Preempted`` (admmprune._errors), which the CLI reports in one line with
exit status 143. Rerunning the same command resumes from that step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopOnSigterm:
    """A context in which SIGTERM sets a flag instead of ending the process.

    Outside the main thread (where Python cannot install handlers) it does
    nothing. The previous handler comes back on exit.
    """

    def __init__(self, every: int = 1):
        self._signalled = False
        self._previous = None
        self._every = every

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    @property
    def signalled(self) -> bool:
        """Whether SIGTERM came to this process."""
        return self._signalled

    def requested(self, step: int) -> bool:
        """Whether to stop at this step boundary.

        One process: at once. Several: every ``every`` steps, when any of them
        got SIGTERM (they must all save the same step), so a scheduler that
        signals one host still stops them all together.
        """
        if jax.process_count() == 1:
            return self._signalled
        if step % self._every:
            return False
        flags = multihost_utils.process_allgather(np.array(int(self._signalled), np.int32))
        return bool(np.any(flags))

"""Where a run's wall time goes: seconds per phase and activity.

Activities:

- ``compute``: the training steps: dispatching them and waiting for their
  results (JAX runs them asynchronously, so waiting is where compute shows).
- ``data``: waiting for the next training batch (reading, decoding,
  shuffling, batching, moving it onto the devices).
- ``eval``: evaluating accuracy on the eval split.
- ``checkpoint``: saving checkpoints and models.
- ``log``: writing ``metrics.jsonl``.

The totals live in the report (``report["time"][phase]``), which every
checkpoint carries, so a resumed run keeps adding to them; each flush of
``metrics.jsonl`` also records its interval's seconds in the ``time`` field of
its last record.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

ACTIVITIES = ("compute", "data", "eval", "checkpoint", "log")


class Clock:
    """Adds wall seconds to ``totals[phase][activity]`` (a dict it updates in place)."""

    def __init__(self, totals: dict[str, dict[str, float]]):
        self.totals = totals
        self.phase: str | None = None
        self._interval: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, activity: str) -> Iterator[None]:
        """Times the block as ``activity`` of the current phase (nothing outside a phase)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(activity, time.perf_counter() - start)

    def add(self, activity: str, seconds: float) -> None:
        if self.phase is None:
            return
        phase = self.totals.setdefault(self.phase, dict.fromkeys(ACTIVITIES, 0.0))
        phase[activity] = phase.get(activity, 0.0) + seconds  # unrounded: a step's dispatch is microseconds
        self._interval[activity] = self._interval.get(activity, 0.0) + seconds

    def interval(self) -> dict[str, float]:
        """The seconds per activity since the previous call (rounded to the millisecond)."""
        out = {k: round(v, 3) for k, v in self._interval.items()}
        self._interval = {}
        return out


def summary(totals: dict[str, dict[str, float]]) -> str:
    """One line: each activity's seconds over all phases, largest first."""
    sums = {a: sum(t.get(a, 0.0) for t in totals.values()) for a in ACTIVITIES}
    return ", ".join(f"{a} {s:.1f}s" for a, s in sorted(sums.items(), key=lambda kv: -kv[1]) if s >= 0.05)

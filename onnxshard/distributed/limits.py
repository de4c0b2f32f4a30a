"""How long a stage call may take, and how often a worker may be replaced: pure rules, no Ray.

Nothing waits forever by default. Unless ``call_timeout_s`` is set, a call's deadline comes from what the stages
have been measured to take (:func:`call_deadline`): 20 times the slowest call seen so far, or the fitted time of
a micro-batch of this size, and never under 30 s; before anything is measured, a first-call allowance (ORT's first
run, CUDA's kernel search). A worker may be replaced ``max_restarts`` times within any ``window_s`` seconds
(:class:`RestartBudget`), so a pipeline that serves for weeks survives rare crashes while a crash loop still fails
fast.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable

DEADLINE_FACTOR = 20.0
MIN_DEADLINE_S = 30.0
FIRST_CALL_S = 300.0


def call_deadline(configured: float | None, slowest_s: float | None, expected_s: float | None = None) -> float:
    """Seconds a stage call may run before its worker counts as hung: ``configured`` if given; else
    ``DEADLINE_FACTOR`` x the larger of the slowest call so far and the ``expected_s`` for this micro-batch, at
    least ``MIN_DEADLINE_S``; ``FIRST_CALL_S`` before any call is measured."""
    if configured is not None:
        return configured
    seen = max((t for t in (slowest_s, expected_s) if t is not None), default=None)
    if seen is None:
        return FIRST_CALL_S
    return max(MIN_DEADLINE_S, DEADLINE_FACTOR * seen)


class RestartBudget:
    """At most ``max_restarts`` replacements of one worker (key) within any ``window_s`` seconds; the times kept
    are only those inside the window, so memory stays bounded however long the pipeline lives."""

    def __init__(self, max_restarts: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_restarts, self.window_s, self.clock = max_restarts, window_s, clock
        self._times: dict[Hashable, deque[float]] = {}

    def spend(self, key: Hashable) -> int:
        """Record one restart of ``key``; return how many it has had in the window, this one included. The caller
        fails when that is over ``max_restarts``."""
        now = self.clock()
        times = self._times.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        times.append(now)
        return len(times)

    def recent(self, key: Hashable) -> int:
        """Restarts of ``key`` within the window (none recorded)."""
        now = self.clock()
        return sum(t > now - self.window_s for t in self._times.get(key, ()))

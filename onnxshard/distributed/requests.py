"""Callers' requests waiting for the pipeline, and the dynamic-batching rule that joins them. No Ray.

Each call (``Pipeline.run``, ``run_async``, ``submit``, each batch of a ``stream``) becomes a :class:`Request`
with a future. Requests wait in a bounded FIFO :class:`RequestQueue`; past ``max_size`` a new one is refused at
once (:class:`~onnxshard.errors.OverloadedError`), never buffered without limit. When the coordinator has room in
its in-flight window it takes a :func:`joinable` prefix of the queue: the oldest request plus the ones behind it
that have the same join key (the same input names, dtypes and non-batch dims, and equal inputs without a batch
axis), up to ``max_batch_size`` samples in all, as Triton's dynamic batcher and Ray Serve's ``@serve.batch`` do.
With an idle pipeline and room to spare it waits up to ``max_queue_delay_s`` (counted from the oldest request's
arrival) for more to join (:func:`wait_for_more`); a busy pipeline takes what is there, since requests pile up
while it works.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from onnxshard.errors import OverloadedError

SMALL_BROADCAST = 1 << 16  # inputs without a batch axis up to this size join by value; larger ones by identity


@dataclass(eq=False)
class Request:
    """One caller's batch. ``key``: requests join only with equal keys (``None``: never joined). ``meter``: what
    the caller's run or stream counts (shared by the requests of one stream). ``index``: the request's position in
    its stream (1 for ``run``), for micro-batch sizing; ``single``: a ``run`` that nothing else overlaps."""

    feeds: dict[str, np.ndarray]
    samples: int
    key: tuple | None
    future: Future = field(default_factory=Future)
    micro_batch_size: int | str | None = None
    meter: object = None
    index: int = 1
    single: bool = False
    timeout_s: float | None = None  # how long the caller waits (run_timeout_s)
    deadline: float | None = None  # time.perf_counter() after which the caller gives up
    enqueued: float = 0.0
    alone: bool = False  # run it in a batch of its own (it failed in a joined one)
    failure: tuple | None = None  # (micro-batch, stage, message) when ONNX Runtime raised on its data


def join_key(feeds: dict[str, np.ndarray], axes) -> tuple | None:
    """What must be equal for two requests to share a batch: per input its name, dtype and shape without the
    batch axis; an input without a batch axis by its value (small) or identity (large). ``None`` without axes."""
    if axes is None:
        return None
    key = []
    for name in sorted(feeds):
        value = np.asarray(feeds[name])
        axis = axes.inputs.get(name)
        if axis is None:
            ident = hashlib.blake2b(value.tobytes(), digest_size=16).hexdigest() if value.nbytes <= SMALL_BROADCAST \
                else ("id", id(feeds[name]))
            key.append((name, value.dtype.str, value.shape, ident))
        else:
            key.append((name, value.dtype.str, value.shape[:axis] + value.shape[axis + 1:], axis))
    return tuple(key)


def joinable(queue: Sequence[Request], max_batch_size: int | None) -> int:
    """How many requests from the head of ``queue`` go in one batch: the first always; then, in order, each with
    the first's key while the samples stay within ``max_batch_size`` (``None`` or 1: no joining)."""
    if not queue:
        return 0
    first = queue[0]
    if not max_batch_size or max_batch_size <= 1 or first.key is None or first.alone:
        return 1
    total, count = first.samples, 1
    for request in list(queue)[1:]:
        if request.key != first.key or request.alone or total + request.samples > max_batch_size:
            break
        total += request.samples
        count += 1
    return count


def wait_for_more(queue: Sequence[Request], now: float, max_batch_size: int | None, max_delay_s: float,
                  idle: bool) -> float:
    """Seconds to wait for more requests before taking a batch: only while the pipeline is ``idle``, the batch
    could still grow (joining is on and the joinable prefix is the whole queue and under ``max_batch_size``), and
    the oldest request has waited less than ``max_delay_s``."""
    if not queue or not idle or max_delay_s <= 0 or not max_batch_size or max_batch_size <= 1:
        return 0.0
    n = joinable(queue, max_batch_size)
    if n < len(queue) or sum(r.samples for r in list(queue)[:n]) >= max_batch_size or queue[0].key is None:
        return 0.0
    return max(0.0, queue[0].enqueued + max_delay_s - now)


class RequestQueue:
    """A bounded FIFO of requests that hands out joined batches (see the module docstring)."""

    def __init__(self, max_size: int, clock: Callable[[], float] = time.monotonic):
        self.max_size = max_size
        self.clock = clock
        self._items: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, request: Request, *, front: bool = False) -> None:
        """Queue ``request`` (``front``: ahead of the others, for a retry), or refuse it at once when full."""
        with self._cond:
            if self._closed:
                raise OverloadedError("the pipeline is closed")
            if not front and len(self._items) >= self.max_size:
                raise OverloadedError(f"overloaded: {len(self._items)} requests are already waiting (max_queue_size="
                                      f"{self.max_size}); retry later, or add replicas")
            request.enqueued = request.enqueued or self.clock()
            (self._items.appendleft if front else self._items.append)(request)
            self._cond.notify_all()

    def take(self, max_batch_size: int | None, max_delay_s: float, *, idle: bool, timeout: float) -> list[Request]:
        """The next batch of requests (cancelled ones dropped), waiting up to ``timeout`` for a first one when
        the queue is empty, and while :func:`wait_for_more` says so for others to join; ``[]`` if none came."""
        end = self.clock() + timeout
        with self._cond:
            while True:
                while self._items and self._items[0].future.cancelled():
                    self._items.popleft()
                if self._items:
                    delay = wait_for_more(self._items, self.clock(), max_batch_size, max_delay_s, idle)
                    if delay <= 0:
                        n = joinable(self._items, max_batch_size)
                        return [self._items.popleft() for _ in range(n)]
                    self._cond.wait(delay)
                    continue
                left = end - self.clock()
                if self._closed or left <= 0:
                    return []
                self._cond.wait(left)

    def close(self) -> list[Request]:
        """Refuse new requests and hand back the ones still waiting."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

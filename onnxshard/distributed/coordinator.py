"""The coordinator's thread: it owns the schedule of one pipeline. It takes requests from the queue as the
in-flight window has room (joined per the dynamic-batching rule), cuts them into micro-batches, sends them through
the transport, takes the oldest result first and hands each caller exactly its rows; its wait recovers lost, hung
and out-of-memory workers (``recovery.Recoverer``). A failure fails the requests it touches, never this thread."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from dataclasses import replace

import numpy as np

from onnxshard.distributed import microbatch, sizing
from onnxshard.distributed.config import PipelineConfig
from onnxshard.distributed.flights import Flight, Group
from onnxshard.distributed.placement import Placement, cause_of
from onnxshard.distributed.recovery import Recoverer
from onnxshard.distributed.requests import Request, RequestQueue
from onnxshard.distributed.stats import CostMeter
from onnxshard.distributed.transports import Transport
from onnxshard.errors import InputError, OnnxShardError, WorkerError
from onnxshard.plans import Plan
from onnxshard.runtime import arrow
from onnxshard.workers import Failure

log = logging.getLogger(__name__)


class Coordinator:
    """Runs ``plan`` on ``placement``'s workers through ``transport`` for the requests put in ``queue``."""

    def __init__(self, plan: Plan, config: PipelineConfig, axes, coupled: tuple[str, ...], placement: Placement,
                 transport: Transport, cost: CostMeter, window: int, byte_limit: float, metrics):
        self.plan, self.config, self.axes, self.coupled = plan, config, axes, coupled
        self.placement, self._transport, self.cost = placement, transport, cost
        self.transport = transport.name
        self.window, self._byte_limit, self._metrics = window, byte_limit, metrics
        self._input_types = {t.name: t.dtype for t in plan.inputs}  # per micro-batch: look up once
        self._sample_bytes: dict = {}  # sizing.sample_bytes by dim sizes
        self._output_names = plan.output_names
        self._outputs = microbatch.ArrayPool()  # large outputs reuse the memory of those the caller dropped
        self._queue = RequestQueue(config.max_queue_size)
        self._window_flights: deque[Flight] = deque()  # micro-batches in the pipeline, oldest first
        self._backlog: deque[tuple] = deque()  # (group, part, chunk) admitted, waiting for room in the window
        self._closing = False
        self._recoverer = Recoverer(config, placement, transport, cost, self._fail_group, lambda: self._closing)
        self.restarts, self.recoveries = self._recoverer.restarts, self._recoverer.recoveries
        self._coupling_warned = False
        self._next_id = 0  # micro-batches sent since start
        self._requests = self._batches = 0  # requests admitted, and the batches they made
        self._thread = threading.Thread(target=self._serve, name="onnxshard-coordinator", daemon=True)
        self._thread.start()

    def put(self, request: Request) -> None:
        """Queue a checked request (raises OverloadedError at once when the queue is full or closed)."""
        if self._closing:
            raise WorkerError("the pipeline is closed")
        self._queue.put(request)
        if not self._backlog and len(self._window_flights) < self.window:
            # room in the window: send it now, not when the oldest micro-batch comes back (the thread waits for
            # that one; meanwhile another replica or stage may run out of work)
            self._transport.wake()

    @property
    def totals(self) -> dict[str, int]:
        return {"requests": self._requests, "batches": self._batches, "micro_batches": self._next_id,
                "queued": len(self._queue)}

    def close(self, kill_workers) -> None:
        """Fail what is queued, wake the thread (closing the transport, then ``kill_workers()``), let it fail
        what is in flight, and wait for it to end."""
        self._closing = True
        for request in self._queue.close():
            if not request.future.done():
                request.future.set_exception(WorkerError("the pipeline is closed"))
        self._transport.close()  # wakes the thread if it waits on a link
        kill_workers()  # ... or on a call
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._outputs.close()

    def _serve(self) -> None:
        """Take requests, cut them into micro-batches, keep the window full and deliver results, until closed.
        A failure fails the requests it touches, never this thread."""
        while not self._closing:
            try:
                self._fill()
                if self._window_flights:
                    self._finish_oldest()
                elif not self._backlog:
                    self._admit(self._take(idle=True, timeout=0.5))
            except BaseException as e:  # noqa: BLE001 - a lost replica, a bug: the callers hear of it
                if self._closing:
                    break
                log.warning("pipeline failed the requests in flight: %s", cause_of(e) if not isinstance(
                    e, OnnxShardError) else e)
                self._fail_in_flight(e if isinstance(e, OnnxShardError) else
                                     WorkerError(f"the coordinator failed: {type(e).__name__}: {e}"))
        self._fail_in_flight(WorkerError("the pipeline is closed"))

    def _fill(self) -> None:
        """Put micro-batches into the window while it has room: the backlog of admitted batches first, then new
        requests (joined per the dynamic-batching rule)."""
        window = self.window
        while len(self._window_flights) < window:
            if self._backlog:
                self._window_flights.append(self._submit(*self._backlog.popleft()))
                self._metrics.in_flight(len(self._window_flights))
                continue
            requests = self._take(idle=not self._window_flights, timeout=0)
            if not requests:
                return
            self._admit(requests)

    def _take(self, *, idle: bool, timeout: float) -> list[Request]:
        """The next batch of requests per the dynamic-batching rule (see requests.RequestQueue.take)."""
        return self._queue.take(self.config.max_batch_size, self.config.max_queue_delay_ms / 1e3, idle=idle,
                                timeout=timeout)

    def _admit(self, requests: list[Request]) -> None:
        """Join ``requests`` into one batch and cut it into micro-batches (queued in the backlog)."""
        live = [r for r in requests if r.future.running() or r.future.set_running_or_notify_cancel()]
        if not live:
            return
        first = live[0]
        size = self.config.micro_batch_size if first.micro_batch_size is None else first.micro_batch_size
        sizes = [r.samples for r in live]
        try:
            feeds = live[0].feeds if len(live) == 1 else microbatch.join([r.feeds for r in live], self.axes)
            slot = self.cost.slot_model() if size == "auto" and self.cost.measured else None
            chunks = self._prepare(feeds, size, first.single and len(live) == 1, first.index, slot)
        except OnnxShardError as e:
            self._fail_requests(live, e)
            return
        self._requests += len(live)
        self._batches += 1
        now = self._queue.clock()
        self._metrics.batch(sum(sizes), [now - r.enqueued for r in live])
        if len(chunks) > 1:
            self._warn_coupled(sum(sizes), microbatch.batch_size(chunks[0], self.axes))
        group = Group(live, microbatch.Assembly([microbatch.batch_size(c, self.axes) for c in chunks], self.axes,
                                                self._outputs), sizes)
        for meter in group.meters:
            meter.samples += sum(r.samples for r in live if r.meter is meter)
        self._backlog.extend((group, part, chunk) for part, chunk in enumerate(chunks))

    def _warn_coupled(self, total: int, size: int) -> None:
        """Say once that cutting this model's batches changes its results, naming the node and the fix."""
        if not self.coupled or self._coupling_warned:
            return
        self._coupling_warned = True
        warnings.warn(f"this model's result for one sample depends on the rest of its batch ({self.coupled[0]}"
                      f"{f' and {len(self.coupled) - 1} more' if len(self.coupled) > 1 else ''}): cutting a batch of "
                      f"{total} into micro-batches of {size} changes its results. Keep batches whole with "
                      f"micro_batch_size={total} or more (--micro-batch-size), or check the difference with "
                      f"`onnxshard verify PLAN --micro-batch-size {size}`", stacklevel=2)

    def _fail_requests(self, requests: list[Request], error: Exception, failure: tuple | None = None) -> None:
        """Fail each of ``requests``; requests that failed in a joined batch are retried alone first, so one
        caller's bad batch fails only that caller."""
        if len(requests) > 1 and failure is not None:
            for r in reversed(requests):
                r.alone = True
                self._queue.put(r, front=True)
            return
        for r in requests:
            r.failure = failure
            if not r.future.done():
                r.future.set_exception(error)

    def _fail_group(self, group: Group, error: Exception, failure: tuple | None = None) -> None:
        """Fail a batch's callers, once: its other micro-batches' later errors and results are dropped."""
        if not group.failed:
            group.failed = True
            self._fail_requests(group.requests, error, failure)

    def _fail_in_flight(self, error: Exception) -> None:
        """Fail every request with a micro-batch in the window or the backlog (the replica is lost for good, or
        the pipeline closes); stop waiting for their results."""
        groups = {id(f.group): f.group for f in self._window_flights}
        groups.update({id(g): g for g, _, _ in self._backlog})
        self._window_flights.clear()
        self._backlog.clear()
        transport = self._transport
        if transport is not None:
            transport.forget()
        for group in groups.values():
            self._fail_group(group, error)

    def _deliver(self, group: Group) -> None:
        outputs = group.assembly.outputs
        parts = [outputs] if len(group.requests) == 1 else microbatch.unmerge(outputs, self.axes, group.sizes)
        for request, part in zip(group.requests, parts):
            if not request.future.done():
                request.future.set_result(part)

    def _prepare(self, feeds, size: int | str | None, single: bool = False, requests: int = 1,
                 slot=None) -> list[dict[str, np.ndarray]]:
        """Cut a batch (its feeds checked by the caller) into micro-batches of ``size`` (``"auto"``: see
        ``auto_micro_batch_size``, with ``requests`` and ``slot``), refusing it first if it would not fit in
        memory."""
        total = microbatch.batch_size(feeds, self.axes)
        per_sample = sizing.sample_bytes(self.plan, self.axes, feeds, self._sample_bytes)
        if size == "auto":
            size = None if self.axes is None else self.auto_micro_batch_size(
                total, stream_sample_bytes=None if single else per_sample[0], requests=requests, slot=slot)
        if size is None and self.axes is not None:
            size = max(1, -(-total // (4 * self.plan.num_stages * self.config.replicas)))
        count = 1 if self.axes is None or not size else -(-total // size)
        sizing.check_fits(per_sample, total if self.axes is not None else 1, count, stages=self.plan.num_stages,
                          window=self.window, limit=self._byte_limit)
        return microbatch.split(feeds, self.axes, size)

    def auto_micro_batch_size(self, total: int, *, stream_sample_bytes: int | None = None, requests: int = 1,
                              slot=None) -> int | None:
        """Samples per micro-batch for a batch of ``total`` samples, from the stage costs measured so far (the rule
        is ``sizing.best_size``): the per-call overhead is the one measured from the runs so far
        (``call_overhead_s`` before that); ``requests``: the batch's position in its stream; in a stream
        (``stream_sample_bytes``: a sample's bytes at the widest stage boundary) the size is capped so the
        micro-batches in flight hold at most a quarter of ``max_batch_bytes``; ``slot``: the fitted slot time
        (``CostMeter.slot_model()``). ``None`` until a first batch has been measured (the default split
        applies)."""
        if not self.cost.measured:
            return None
        k = self.plan.num_stages
        per_replica = max(1, -(-total // self.config.replicas))
        largest = None if stream_sample_bytes is None else sizing.stream_cap(
            stream_sample_bytes, stages=k, window=self.window, byte_limit=self._byte_limit)
        overhead = self.cost.overhead_s if self.cost.overhead_s is not None else self.config.call_overhead_s
        return sizing.auto_size(self.cost, per_replica, stages=k, overhead_s=overhead, requests=requests,
                                largest=largest, slot=slot)

    def _submit(self, group: Group, part: int, chunk: dict[str, np.ndarray]) -> Flight:
        mb = self._next_id
        self._next_id += 1
        batch = arrow.encode(chunk, self._input_types)
        # refs[0] is the packet itself: Ray sends it inline (or stores it) with the call, and a replay resends it.
        flight = Flight(group, part, mb, mb % self.config.replicas, [(batch, ())],
                        samples=microbatch.batch_size(chunk, self.axes), submitted=time.monotonic())
        for meter in group.meters:
            meter.micro_batches += 1
        self._transport.send(flight)
        return flight

    def _finish_oldest(self) -> None:
        """Wait for the oldest micro-batch, recovering lost workers on the way; store its result once, and hand a
        batch's outputs to its callers when its last micro-batch is in. Returns early, finishing nothing, when a
        new request can be sent first (see ``put``)."""
        window = self._window_flights
        flight = window[0]
        try:
            got = self._recoverer.wait(flight, window)
        except WorkerError as e:
            if e.micro_batch != flight.id:
                raise  # the replica is lost: every request in flight fails
            window.popleft()  # this micro-batch alone ran out of retries (or its batch had failed): the rest goes on
            self._fail_group(flight.group, e)
            return
        if got is None:
            return
        result, stats = got
        calls = [replace(c, replica=flight.replica) for c in stats]
        window.popleft()
        self._metrics.in_flight(len(window))
        group = flight.group
        self.cost.add(calls, flight.samples)
        self._metrics.calls(calls)
        self._recoverer.note_call(max((c.compute_s for c in calls), default=0.0))
        for meter in group.meters:
            meter.add(calls)
        if group.failed:
            return  # its callers already have their error (a data failure, a deadline)
        if isinstance(result, Failure):
            self._fail_data(group, flight, result)
            return
        # a result read off a direct link lies in a buffer of its own: its tensors need no copy
        direct = self.transport == "direct"
        if group.assembly.add(flight.part, arrow.decode(result, self._output_names, writable=direct)):
            for meter in group.meters:
                meter.delivered += 1
        if group.assembly.done:
            self._deliver(group)

    def _fail_data(self, group: Group, flight: Flight, failure: Failure) -> None:
        """ONNX Runtime raised on this micro-batch's data: its batch fails (or is retried request by request, when
        several callers' requests were joined), never retried as it is."""
        prefix = f"stage {failure.stage}, micro-batch {flight.id}"
        message = failure.message if failure.message.startswith(prefix) else f"{prefix}: {failure.message}"
        error = InputError(message) if failure.kind == "InputError" else \
            WorkerError(message, stage=failure.stage, micro_batch=flight.id)
        self._fail_group(group, error, failure=(flight.id, failure.stage, message))

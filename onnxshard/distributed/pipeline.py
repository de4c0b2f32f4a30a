"""The Pipeline: a plan running as Ray actors, serving many callers at once.

Every call (``run``, ``stream``, ``submit``, ``run_async``; from any thread or asyncio task) becomes a request in
one bounded queue (``requests.py``: dynamic batching joins requests that wait together). One coordinator thread
per pipeline owns the schedule: it takes requests as its in-flight window has room, cuts them into micro-batches
(``sizing.py``, ``microbatch.py``), deals micro-batch ``i`` to replica ``i % R``, sends them through a transport
(``transports.py``: Ray actor calls, or direct Unix-socket links on one node), takes the oldest result first (so
memory stays flat) and hands each caller exactly its rows.

Recovery is one procedure for both transports: Ray retries nothing (a retried call can run twice and out of
order); when a worker dies, hangs past its call deadline (``limits.py``) or runs out of memory, the coordinator
replaces it in the same placement-group bundle (``placement.py``) within the restart budget, and sends again the
micro-batches it took with it, each within ``max_retries``. A result is stored once per micro-batch id, so
nothing is lost or repeated. A failure fails the requests it touches, never the coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from onnxshard.distributed import cluster, microbatch, sizing
from onnxshard.distributed.config import PipelineConfig, check_config, check_size_option
from onnxshard.distributed.flights import Flight, Group, Recovery, Skipped
from onnxshard.distributed.limits import RestartBudget, call_deadline
from onnxshard.distributed.placement import Placement, cause_of, kill
from onnxshard.distributed.requests import Request, RequestQueue, join_key
from onnxshard.distributed.stats import CostMeter, Meter, RunStats
from onnxshard.distributed.transports import Links, Lost, RayCalls, Transport
from onnxshard.errors import InputError, OnnxShardError, PlanError, WorkerError
from onnxshard.plans import Plan, is_plan_dir
from onnxshard.runtime import arrow
from onnxshard.runtime.session import check_feeds
from onnxshard.workers import Failure

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
HISTORY = 100  # entries kept in pipe.recoveries and pipe.skipped


class Pipeline:
    """A plan running as Ray actors, one per stage per replica. Use as a context manager::

        with onnxshard.Pipeline("plan/", micro_batch_size=4) as pipe:
            outputs = pipe.run({"x": x})
    """

    def __init__(self, plan: Plan | str | os.PathLike, *, stages: int | None = None,
                 address: str | None = None, config: PipelineConfig | None = None, **options):
        self.config = replace(config or PipelineConfig(), **options)
        check_config(self.config)  # before Ray starts (seconds), so a typo costs nothing
        self._tmp: Path | None = None
        self.plan = self._resolve_plan(plan, stages)
        self.axes = microbatch.infer_batch_axes(self.plan, self.config.batch_axes)
        # nodes mixing samples along the batch dim: cutting or joining batches changes their results
        self.coupled = self.plan.batch_coupled.get(microbatch.batch_dim(self.plan, self.axes), ())
        self._coupling_warned = False
        if self.coupled and self.config.max_batch_size:
            log.warning("max_batch_size is ignored: %s; requests are never joined", self.coupled[0])
        self._input_types = {t.name: t.dtype for t in self.plan.inputs}  # per micro-batch: look up once
        self._output_names = self.plan.output_names
        self._owns_ray = False
        self.placement: Placement | None = None
        self.restarts: dict[tuple[int, int], int] = {}  # every restart of each worker, for the record
        # the histories keep their last entries only: a pipeline may serve for weeks
        self.recoveries: deque[Recovery] = deque(maxlen=HISTORY)
        self.skipped: deque[Skipped] = deque(maxlen=HISTORY)
        self.stats: RunStats | None = None
        self._budget = RestartBudget(self.config.max_restarts, self.config.restart_window_s)
        self._queue = RequestQueue(self.config.max_queue_size)
        self._window_flights: deque[Flight] = deque()  # micro-batches in the pipeline, oldest first
        self._backlog: deque[tuple] = deque()  # (group, part, chunk) admitted, waiting for room in the window
        self._slowest_s: float | None = None  # the slowest stage call so far (warm-up included): call deadlines
        self._closing = False
        self._thread: threading.Thread | None = None
        self._next_id = 0  # micro-batches sent since start
        self._requests = self._batches = 0  # requests admitted, and the batches they made (see totals)
        self._in_flight_gauge = None
        self._transport: Transport | None = None
        self._outputs = microbatch.ArrayPool()  # large outputs reuse the memory of those the caller dropped
        self.transport = "ray"
        self.cost = CostMeter([s.tensor_parallel for s in self.plan.stages])
        try:
            self._start(address)
        except BaseException:
            self.close()
            raise
        # One thread owns the schedule: every caller's request goes through its queue (see _serve).
        self._thread = threading.Thread(target=self._serve, name="onnxshard-coordinator", daemon=True)
        self._thread.start()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _resolve_plan(self, plan, stages) -> Plan:
        if isinstance(plan, Plan):
            if plan.root is None:
                raise PlanError("the plan has not been saved; use onnxshard.plan(model, out_dir) first")
            return plan
        path = Path(plan)
        if is_plan_dir(path):
            return Plan.load(path)
        if path.is_file():
            from onnxshard.api import plan as make_plan

            self._tmp = Path(tempfile.mkdtemp(prefix="onnxshard-pipeline-"))
            return make_plan(path, self._tmp / "plan", stages=2 if stages is None else stages)
        raise PlanError(f"{path} is neither a plan folder nor an ONNX model file")

    def _start(self, address: str | None) -> None:
        self._owns_ray = cluster.connect(address, self.config.connect_timeout_s)
        cfg = self.config
        self.placement = Placement(self.plan, cfg, owns_ray=self._owns_ray)
        self._note_warm_up()
        self._transport = Links(self.placement, cfg.worker_start_timeout_s, self._window()) \
            if self.placement.transport(cfg.transport) == "direct" else RayCalls(self.plan, self.placement)
        self.transport = self._transport.name
        self._byte_limit = cfg.max_batch_bytes or int(0.8 * ray.available_resources().get("object_store_memory",
                                                                                           2**62))
        from ray.util.metrics import Gauge

        self._in_flight_gauge = Gauge("onnxshard_pipeline_in_flight", "micro-batches in the pipeline (queue depth)")

    @property
    def workers(self) -> list[list[list]]:
        """The stage workers' actor handles, ``[replica][stage][rank]`` (empty once closed)."""
        return self.placement.workers if self.placement is not None else []

    @property
    def worker_info(self) -> list[list[list[dict]]]:
        """What each worker said when it was ready (node, pid, threads, warm-up seconds)."""
        return self.placement.info if self.placement is not None else []

    def _note_warm_up(self) -> None:
        """The workers' warm-up runs are a first measurement for the call deadline (one sample, cold: slow)."""
        warm = self.placement.warm_seconds()
        if warm:
            self._slowest_s = max([self._slowest_s or 0.0, *warm])

    def _window(self) -> int:
        """Micro-batches in the pipeline at once."""
        return self.config.max_in_flight or 2 * self.plan.num_stages * self.config.replicas

    def close(self) -> None:
        """Fail what is still queued or in flight, stop the workers, free their placement group, and shut Ray
        down if this pipeline started it."""
        self._closing = True
        for request in self._queue.close():
            if not request.future.done():
                request.future.set_exception(WorkerError("the pipeline is closed"))
        if self._transport is not None:
            self._transport.close()  # wakes the coordinator's thread if it waits on a link
        if self.placement is not None:
            kill([w for row in self.workers for ranks in row for w in ranks])  # wakes a thread waiting on a call
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # woken by the closed links or the killed workers, it fails what was
            self._thread = None  # in flight and ends
        self._transport = None
        if self.placement is not None:
            self.placement.close()
            self.placement = None
        self._outputs.close()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def totals(self) -> dict[str, int]:
        """Since the pipeline started: requests run, the batches they made (fewer than requests when dynamic
        batching joined some), micro-batches sent, and requests waiting in the queue now."""
        return {"requests": self._requests, "batches": self._batches, "micro_batches": self._next_id,
                "queued": len(self._queue)}

    # -- calling ---------------------------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray], *, micro_batch_size: int | str | None = None,
               progress: Progress | None = None, timeout_s: float | None = None) -> Future:
        """Queue one batch and return a ``concurrent.futures.Future`` of its outputs. Safe from any thread; the
        feeds are checked here (an :class:`InputError` is raised at once), and a full queue raises
        :class:`OverloadedError` at once. Requests that wait together may be joined (``max_batch_size``)."""
        meter = self._meter(progress)
        request = self._request(feeds, micro_batch_size, meter, 1, single=True, timeout_s=timeout_s)
        request.future.add_done_callback(lambda _: self._summarise(meter))
        return request.future

    async def run_async(self, feeds: dict[str, np.ndarray], *, micro_batch_size: int | str | None = None,
                        timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """``run`` for asyncio callers (a Serve deployment, an async web handler): awaits the result without
        blocking the event loop."""
        return await asyncio.wrap_future(self.submit(feeds, micro_batch_size=micro_batch_size, timeout_s=timeout_s))

    def run(self, feeds: dict[str, np.ndarray], *, micro_batch_size: int | str | None = None,
            progress: Progress | None = None) -> dict[str, np.ndarray]:
        """Outputs of the whole model for one batch (the same as ONNX Runtime on the unsplit model). Many threads
        may call it at once; each gets its own rows."""
        return next(self._results([feeds], micro_batch_size, progress, "raise", single=True))[1]

    def stream(self, batches: Iterable[dict[str, np.ndarray]], *, micro_batch_size: int | str | None = None,
               progress: Progress | None = None, on_error: str = "raise",
               coalesce: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Results for each batch of ``batches``, in order, with a bounded number of batches submitted ahead.

        ``micro_batch_size`` overrides the pipeline's for these batches; ``progress(done, submitted)`` is called as
        each micro-batch completes (from the coordinator's thread: keep it quick). ``on_error="skip"`` leaves out a
        batch whose micro-batch fails on its data (ONNX Runtime raised on it) and lists it in ``self.skipped``;
        ``"raise"`` raises. Other callers may use the pipeline meanwhile (a ``run`` inside the loop included).

        ``coalesce=N`` joins consecutive batches of this stream into batches of up to N samples before they are
        cut into micro-batches, so a stream of small requests makes fewer, larger calls; each still gets its own
        result, in order. It reads ahead in ``batches`` for up to N samples, so use it on streams that are already
        there (files, queues); requests from many callers are joined by ``max_batch_size`` instead."""
        if not coalesce:
            for _, outputs in self._results(batches, micro_batch_size, progress, on_error):
                yield outputs
            return
        if self.axes is None:
            raise InputError("coalesce needs the batch axis of every input and output; pass batch_axes")
        groups: list[list[int]] = []

        def joined():
            for feeds, sizes in microbatch.coalesce(batches, self.axes, coalesce, check=self._check_request):
                groups.append(sizes)
                yield feeds

        skipped: list[Skipped] = []
        try:
            for index, outputs in self._results(joined(), micro_batch_size, progress, on_error, skipped=skipped):
                yield from microbatch.unmerge(outputs, self.axes, groups[index])
        finally:  # a skipped joined batch leaves out each request in it
            firsts = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(int)
            self.skipped.extend(replace(s, request=int(r)) for s in skipped
                                for r in range(firsts[s.request], firsts[s.request + 1]))

    def _results(self, batches, micro_batch_size, progress, on_error, *, single: bool = False,
                 skipped: list | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(index, outputs) for each batch that is not skipped, in order; at most a window's worth of batches is
        submitted ahead. ``single``: one batch (``run``). ``skipped``: where skipped batches are listed (default
        ``self.skipped``)."""
        check_size_option(micro_batch_size, InputError)
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
        meter = self._meter(progress)
        ahead: deque[tuple[int, Request]] = deque()
        limit = max(2, self._window())
        skipped = self.skipped if skipped is None else skipped

        def oldest():
            index, request = ahead.popleft()
            try:
                return index, _wait(request.future)
            except OnnxShardError:
                if on_error == "skip" and request.failure is not None:
                    skipped.append(Skipped(index, *request.failure))
                    return None
                raise

        try:
            for index, feeds in enumerate(batches):
                ahead.append((index, self._request(feeds, micro_batch_size, meter, index + 1, single=single)))
                while ahead and (len(ahead) >= limit or ahead[0][1].future.done()):
                    if (got := oldest()) is not None:
                        yield got
            while ahead:
                if (got := oldest()) is not None:
                    yield got
        finally:
            for _, request in ahead:  # a stream left early: what has not started is not run
                request.future.cancel()
            self._summarise(meter)

    def _meter(self, progress: Progress | None) -> Meter:
        return Meter([s.tensor_parallel for s in self.plan.stages], progress)

    def _summarise(self, meter: Meter) -> None:
        self.stats = meter.summary(self.config.replicas)
        self.cost.observe(self.stats)

    def _request(self, feeds, micro_batch_size, meter: Meter, index: int, *, single: bool,
                 timeout_s: float | None = None) -> Request:
        """Check ``feeds`` (in the caller's thread: bad input never reaches the queue) and queue them."""
        check_size_option(micro_batch_size, InputError)
        if not self.workers or self._closing:
            raise WorkerError("the pipeline is closed")
        self._check_request(feeds)
        samples = microbatch.batch_size(feeds, self.axes)  # the memory check waits for the split (_prepare)
        timeout_s = timeout_s if timeout_s is not None else self.config.run_timeout_s
        key = None if self.coupled else join_key(feeds, self.axes)  # a coupled model's requests never join
        request = Request(feeds, samples, key, micro_batch_size=micro_batch_size,
                          meter=meter, index=index, single=single, timeout_s=timeout_s,
                          deadline=None if timeout_s is None else time.perf_counter() + timeout_s)
        self._queue.put(request)
        return request

    # -- the coordinator's thread ----------------------------------------------------------------------------
    def _serve(self) -> None:
        """Take requests, cut them into micro-batches, keep the window full and deliver results, until closed.
        A failure fails the requests it touches, never this thread."""
        while not self._closing:
            try:
                self._fill()
                if self._window_flights:
                    self._finish_oldest()
                elif not self._backlog:
                    self._admit(self._queue.take(self.config.max_batch_size, self.config.max_queue_delay_ms / 1e3,
                                                 idle=True, timeout=0.5))
            except BaseException as e:  # noqa: BLE001 - a lost replica, a bug: the callers hear of it
                if self._closing:
                    break
                log.warning("pipeline failed the requests in flight: %s", _cause(e) if not isinstance(
                    e, OnnxShardError) else e)
                self._fail_in_flight(e if isinstance(e, OnnxShardError) else
                                     WorkerError(f"the coordinator failed: {type(e).__name__}: {e}"))
        self._fail_in_flight(WorkerError("the pipeline is closed"))

    def _fill(self) -> None:
        """Put micro-batches into the window while it has room: the backlog of admitted batches first, then new
        requests (joined per the dynamic-batching rule)."""
        window = self._window()
        while len(self._window_flights) < window:
            if self._backlog:
                self._window_flights.append(self._submit(*self._backlog.popleft()))
                self._in_flight_gauge.set(len(self._window_flights))
                continue
            requests = self._queue.take(self.config.max_batch_size, self.config.max_queue_delay_ms / 1e3,
                                        idle=not self._window_flights, timeout=0)
            if not requests:
                return
            self._admit(requests)

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
            chunks, _ = self._prepare(feeds, size, first.single and len(live) == 1, first.index, slot)
        except OnnxShardError as e:
            self._fail_requests(live, e)
            return
        self._requests += len(live)
        self._batches += 1
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
            group.failed = True
            self._fail_requests(group.requests, error)

    def _deliver(self, group: Group) -> None:
        outputs = group.assembly.outputs
        parts = [outputs] if len(group.requests) == 1 else microbatch.unmerge(outputs, self.axes, group.sizes)
        for request, part in zip(group.requests, parts):
            if not request.future.done():
                request.future.set_result(part)

    def _prepare(self, feeds, size: int | str | None, single: bool = False, requests: int = 1,
                 slot=None) -> tuple[list[dict[str, np.ndarray]], int]:
        """Check a batch against the model's inputs and split it, before anything is scheduled; also return its
        batch size. ``requests``/``slot``: see ``auto_micro_batch_size``."""
        self._check_request(feeds)
        total = microbatch.batch_size(feeds, self.axes)
        per_sample = sizing.sample_bytes(self.plan, self.axes, feeds)
        if size == "auto":
            size = None if self.axes is None else self.auto_micro_batch_size(
                total, stream_sample_bytes=None if single else per_sample[0], requests=requests, slot=slot)
        if size is None and self.axes is not None:
            size = max(1, -(-total // (4 * self.plan.num_stages * self.config.replicas)))
        count = 1 if self.axes is None or not size else -(-total // size)
        sizing.check_fits(per_sample, total if self.axes is not None else 1, count, stages=self.plan.num_stages,
                          window=self._window(), limit=self._byte_limit)
        return microbatch.split(feeds, self.axes, size), total

    def _check_request(self, feeds) -> None:
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
        check_feeds(feeds, self.plan.inputs, where="model")

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
            stream_sample_bytes, stages=k, window=self._window(), byte_limit=self._byte_limit)
        overhead = self.cost.overhead_s if self.cost.overhead_s is not None else self.config.call_overhead_s
        return sizing.best_size(per_replica, stages=k, slot=slot or self.cost.slot_model(), overhead_s=overhead,
                                requests=requests, largest=largest)

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
        batch's outputs to its callers when its last micro-batch is in."""
        window = self._window_flights
        flight = window[0]
        try:
            result, stats = self._wait(flight, window)
        except WorkerError as e:
            if e.micro_batch != flight.id:
                raise  # the replica is lost: every request in flight fails
            window.popleft()  # this micro-batch alone ran out of retries: its batch fails, the rest goes on
            flight.group.failed = True
            self._fail_requests(flight.group.requests, e)
            return
        calls = [replace(c, replica=flight.replica) for c in stats]
        window.popleft()
        self._in_flight_gauge.set(len(window))
        group = flight.group
        self.cost.add(calls, flight.samples)
        slowest = max((c.compute_s for c in calls), default=0.0)
        self._slowest_s = max(self._slowest_s or 0.0, slowest)
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

    def _wait(self, flight: Flight, window: deque[Flight]) -> tuple:
        """The packet of ``flight``, recovering lost, hung and out-of-memory workers on the way."""
        while True:
            try:
                result = self._transport.take(flight, self._wait_budget(flight))
            except TimeoutError:
                self._on_timeout(flight, window)
                continue
            except Lost as e:
                self._recover(e.replica, e.stages, e.cause, window, micro_batch=flight.id)
                continue
            failure = result[0]
            if not (isinstance(failure, Failure) and failure.kind == "ResourceError"):
                return result
            # out of memory, a device error: not the data's fault; a fresh worker runs it again
            self._recover(flight.replica, [failure.stage], failure.message, window, force=flight,
                          micro_batch=flight.id)

    def _call_deadline(self, flight: Flight) -> float:
        """How long a stage call of ``flight`` may run (see ``limits.call_deadline``)."""
        return call_deadline(self.config.call_timeout_s, self._slowest_s, self.cost.slot_seconds(flight.samples))

    def _wait_budget(self, flight: Flight) -> float:
        budget = self._call_deadline(flight)
        deadline = flight.group.deadline
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.perf_counter()))
        return budget

    def _on_timeout(self, flight: Flight, window: deque[Flight]) -> None:
        group = flight.group
        if group.deadline is not None and time.perf_counter() >= group.deadline:
            # the caller gives up; the micro-batch stays in the window and its result is dropped when it comes
            group.deadline, group.failed = None, True
            timeout = min(r.timeout_s for r in group.requests if r.timeout_s is not None)
            self._fail_requests(group.requests, WorkerError(
                f"run deadline of {timeout:g} s passed with micro-batch {flight.id} still in the pipeline; raise "
                "run_timeout_s or check the workers", micro_batch=flight.id))
            return
        limit = self._call_deadline(flight)
        if time.monotonic() - flight.submitted < limit:
            return
        hung = self._transport.hung(flight, limit)
        if hung:  # else the micro-batch is only queued behind slow ones: keep waiting
            log.warning("stage %s (replica %d) has run micro-batch %d for over %gs: replacing it as hung",
                        hung, flight.replica, flight.id, limit)
            self._recover(flight.replica, hung, f"hung for over {limit:g} s (call deadline)", window)

    def _recover(self, replica: int, stages: list[int], cause: str, window: deque[Flight], *,
                 force: Flight | None = None, micro_batch: int | None = None) -> None:
        """The one recovery, for both transports: replace the ``stages`` of ``replica`` (within the restart
        budget), make the replica whole again, and send again each of its in-flight micro-batches that the lost
        workers took with them (each within ``max_retries``; ``force``: also this one, whose result came back as
        a resource failure)."""
        t0 = time.perf_counter()
        for stage in stages:
            self._replace_stage(replica, stage, cause, micro_batch)
        self._transport.relink(replica)
        first = min(stages) if stages else None  # None: the chain broke with every worker alive
        replayed = 0
        for flight in self._transport.lost(replica, first, window, force):  # oldest first: the new worker gets
            self._count_replay(flight, cause, first)                        # them in order
            if not self._transport.resend(flight, first):
                break  # the replica broke again: the next wait finds out and recovers again
            replayed += 1
        self.recoveries.append(Recovery(-1 if first is None else first, replica, cause, time.perf_counter() - t0,
                                        replayed))

    def _count_replay(self, flight: Flight, cause: str, stage: int | None) -> None:
        """One more replay of ``flight``, within ``max_retries``."""
        flight.replays += 1
        if flight.replays > self.config.max_retries:
            raise WorkerError(f"micro-batch {flight.id} was replayed {flight.replays - 1} times, over "
                              f"max_retries={self.config.max_retries}; last cause: {cause}",
                              stage=stage, micro_batch=flight.id)
        for meter in flight.group.meters:
            meter.replayed += 1

    def _replace_stage(self, replica: int, stage: int, cause: str, micro_batch: int | None = None) -> None:
        """Kill a stage's workers and start new ones in their bundles, within ``max_restarts``."""
        if self._closing:
            raise WorkerError("the pipeline is closed")
        key = (replica, stage)
        self.restarts[key] = self.restarts.get(key, 0) + 1  # in all, for the record
        recent = self._budget.spend(key)
        if recent > self.config.max_restarts:
            where = "" if micro_batch is None else f" (micro-batch {micro_batch})"
            raise WorkerError(f"stage {stage} worker (replica {replica}) was lost {recent} times, over "
                              f"max_restarts={self.config.max_restarts} within restart_window_s="
                              f"{self.config.restart_window_s:g}; last cause: {cause}{where}", stage=stage)
        log.warning("stage %d worker (replica %d) lost (%s); starting a replacement", stage, replica, cause)
        self.placement.replace(replica, stage)
        self._note_warm_up()

    def _fail_data(self, group: Group, flight: Flight, failure: Failure) -> None:
        """ONNX Runtime raised on this micro-batch's data: its batch fails (or is retried request by request, when
        several callers' requests were joined), never retried as it is."""
        prefix = f"stage {failure.stage}, micro-batch {flight.id}"
        message = failure.message if failure.message.startswith(prefix) else f"{prefix}: {failure.message}"
        error = InputError(message) if failure.kind == "InputError" else \
            WorkerError(message, stage=failure.stage, micro_batch=flight.id)
        group.failed = True
        self._fail_requests(group.requests, error, failure=(flight.id, failure.stage, message))


def _wait(future: Future):
    """A future's result, waiting in short slices so Ctrl-C reaches the caller at once; the coordinator's
    deadlines make sure it is resolved."""
    while True:
        try:
            return future.result(timeout=0.5)
        except FutureTimeout:
            continue


_cause = cause_of

"""The Pipeline: a plan running as Ray actors, serving many callers at once.

Every call (``run``, ``stream``, ``submit``, ``run_async``; from any thread or asyncio task) becomes a request in
one bounded queue (``requests.py``: dynamic batching joins requests that wait together). One coordinator thread
per pipeline owns the schedule: it takes requests as its in-flight window has room, cuts them into micro-batches
(``sizing.py``, ``microbatch.py``), deals micro-batch ``i`` to replica ``i % R``, sends them through a transport
(``transports.py``: Ray actor calls, or direct socket links), takes the oldest result first (so
memory stays flat) and hands each caller exactly its rows.

Recovery is one procedure for both transports: Ray retries nothing (a retried call can run twice and out of
order); when a worker dies, hangs past its call deadline (``limits.py``) or runs out of memory, the coordinator
replaces it in the same placement-group bundle (``placement.py``) within the restart budget, and sends again the
micro-batches it took with it, each within ``max_retries``. A result is stored once per micro-batch id, so
nothing is lost or repeated. A failure fails the requests it touches, never the coordinator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from onnxshard import plan_store
from onnxshard.distributed import cluster, microbatch
from onnxshard.distributed.config import PipelineConfig, check_config, check_size_option
from onnxshard.distributed.coordinator import Coordinator
from onnxshard.distributed.flights import Recovery, Skipped
from onnxshard.distributed.placement import Placement, kill
from onnxshard.distributed.requests import Request, join_key
from onnxshard.distributed.stats import CostMeter, Meter, RunStats
from onnxshard.distributed.transports import Links, RayCalls, Transport
from onnxshard.errors import InputError, OnnxShardError, PlanError, WorkerError
from onnxshard.plans import NON_TENSOR, Plan, is_plan_dir
from onnxshard.runtime.session import check_feeds

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
HISTORY = 100  # entries kept in pipe.skipped


class Pipeline:
    """A plan running as Ray actors, one per stage per replica. Use as a context manager::

        with onnxshard.Pipeline("plan/", micro_batch_size=4) as pipe:
            outputs = pipe.run({"x": x})

    Given an ONNX model file instead of a plan, it plans the model (``stages``, default 2) when the first batch
    comes, at that batch's sizes of the symbolic dims (so a sequence length or image size weighs in the cut), and
    starts the workers then (or at :meth:`start`); until that, ``plan`` is ``None`` and there are no workers.
    """

    def __init__(self, plan: Plan | str | os.PathLike, *, stages: int | None = None,
                 address: str | None = None, config: PipelineConfig | None = None, **options):
        self.config = replace(config or PipelineConfig(), **options)
        check_config(self.config)  # before Ray starts (seconds), so a typo costs nothing
        self._tmp: Path | None = None
        self._owns_ray = False
        self.placement: Placement | None = None
        self._coordinator: Coordinator | None = None
        self._transport: Transport | None = None
        self.skipped: deque[Skipped] = deque(maxlen=HISTORY)  # a pipeline may serve for weeks: the last ones
        self.stats: RunStats | None = None  # the last call's (with concurrent callers: whichever ended last)
        self._tally_lock = threading.Lock()
        self.transport = "ray"
        self.plan: Plan | None = None
        self.axes, self.coupled, self.busy_s, self.cost = None, (), [], None  # set with the plan (_setup)
        # a model file: planned and started at the first batch, at that batch's sizes (see start)
        self._pending: tuple | None = None
        self._start_lock = threading.Lock()
        if not isinstance(plan, Plan) and not plan_store.is_uri(plan) and not is_plan_dir(Path(plan)):
            if not Path(plan).is_file():
                raise PlanError(f"{plan} is neither a plan folder nor an ONNX model file")
            from onnxshard.partitioner.analysis import input_specs

            # read now (its graph, not its weights), so a file that is no model is refused here
            self._pending = (Path(plan), stages, address, input_specs(plan))
            return
        self._setup(self._opened(plan), address)

    # -- lifecycle -------------------------------------------------------------------------------------------
    @staticmethod
    def _opened(plan) -> Plan:
        if isinstance(plan, Plan):
            if plan.root is None and plan.uri is None:
                raise PlanError("the plan has not been saved; use onnxshard.plan(model, out_dir) first")
            return plan
        return plan_store.open_plan(plan)

    def _setup(self, plan: Plan, address: str | None) -> None:
        self.plan = plan
        if self.config.replicas is None:
            self.config = replace(self.config, replicas=plan.replicas)
        try:
            _check_tensors_only(plan)
            self.axes = microbatch.infer_batch_axes(plan, self.config.batch_axes)
            # nodes mixing samples along the batch dim: cutting or joining batches changes their results
            self.coupled = plan.batch_coupled.get(microbatch.batch_dim(plan, self.axes), ())
            if self.coupled and self.config.max_batch_size:
                log.warning("max_batch_size is ignored: %s; requests are never joined", self.coupled[0])
            self.busy_s = [0.0] * len(plan.stages)  # each stage's busy seconds over every call so far
            self.cost = CostMeter([s.tensor_parallel for s in plan.stages])
            self._start(address)
        except BaseException:
            self.close()
            raise

    def start(self, example_inputs: dict[str, np.ndarray] | None = None) -> Pipeline:
        """Plan and start a pipeline made from a model file now, rather than at its first batch: the
        ``example_inputs`` (the first batch, when called by it) size the plan's costs (``plan(example_inputs=)``),
        for a sequence length or an image size; without them, symbolic dims count as 1. Bad inputs raise here and
        leave it unstarted. A pipeline already started (from a plan) is returned as it is."""
        if self._pending is None:
            if self.plan is None:
                raise WorkerError("the pipeline is closed")
            return self
        with self._start_lock:
            if self._pending is None:
                return self
            from onnxshard.api import plan as make_plan

            model, stages, address, inputs = self._pending
            if example_inputs is not None:  # refused as a started pipeline refuses them
                _check_feeds(example_inputs, inputs)
            self._tmp = Path(tempfile.mkdtemp(prefix="onnxshard-pipeline-"))
            try:
                plan = make_plan(model, self._tmp / "plan", stages=2 if stages is None else stages,
                                 example_inputs=example_inputs)
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
                raise
            self._pending = None
            self._setup(plan, address)
        return self

    def _start(self, address: str | None) -> None:
        self._owns_ray = cluster.connect(address, self.config.connect_timeout_s)
        cfg = self.config
        self.placement = Placement(self.plan, cfg, owns_ray=self._owns_ray)
        # held here until the coordinator owns it, so an interrupt in between still closes it (its sockets)
        self._transport = Links(self.placement, cfg.worker_start_timeout_s, self._window()) \
            if self.placement.transport(cfg.transport) == "direct" else RayCalls(self.plan, self.placement)
        self.transport = self._transport.name
        byte_limit = cfg.max_batch_bytes or int(0.8 * ray.available_resources().get("object_store_memory", 2**62))
        from onnxshard.distributed.metrics import PipelineMetrics

        # One thread owns the schedule: every caller's request goes through its queue.
        self._coordinator = Coordinator(self.plan, cfg, self.axes, self.coupled, self.placement, self._transport,
                                        self.cost, self._window(), byte_limit,
                                        PipelineMetrics(cfg.name))

    @property
    def workers(self) -> list[list[list]]:
        """The stage workers' actor handles, ``[replica][stage][rank]`` (empty once closed)."""
        return self.placement.workers if self.placement is not None else []

    @property
    def worker_info(self) -> list[list[list[dict]]]:
        """What each worker said when it was ready (node, pid, threads, warm-up seconds)."""
        return self.placement.info if self.placement is not None else []

    @property
    def hops(self) -> list[list[str]]:
        """Per replica, how each hop of its direct links goes (``unix`` or ``tcp``): coordinator to stage 0, stage
        to stage, last stage to the coordinator. Empty on the ray transport."""
        return [list(kinds) for _, kinds in sorted(self._transport.links.kinds.items())] \
            if isinstance(self._transport, Links) else []

    def _window(self) -> int:
        """Micro-batches in the pipeline at once."""
        return self.config.max_in_flight or 2 * self.plan.num_stages * self.config.replicas

    def close(self) -> None:
        """Fail what is still queued or in flight, stop the workers, free their placement group, and shut Ray
        down if this pipeline started it."""
        self._pending = None
        if self._coordinator is not None:  # closes the transport too
            self._coordinator.close(lambda: kill([w for row in self.workers for ranks in row for w in ranks]))
            self._coordinator = None
        elif self._transport is not None:
            self._transport.close()
        self._transport = None
        if self.placement is not None:
            self.placement.close()
            self.placement = None
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
        return self._coordinator.totals if self._coordinator is not None else {}

    @property
    def recoveries(self) -> deque[Recovery]:
        """Workers replaced so far (the last 100)."""
        return self._coordinator.recoveries if self._coordinator is not None else deque()

    @property
    def restarts(self) -> dict[tuple[int, int], int]:
        """Every restart of each worker, ``(replica, stage) -> count``."""
        return self._coordinator.restarts if self._coordinator is not None else {}

    def auto_micro_batch_size(self, total: int, **kwargs) -> int | None:
        """See ``Coordinator.auto_micro_batch_size``: the size ``"auto"`` picks now for a batch of ``total``."""
        self.start(None)
        return self._coordinator.auto_micro_batch_size(total, **kwargs)

    # -- calling ---------------------------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray], *, micro_batch_size: int | str | None = None,
               progress: Progress | None = None, timeout_s: float | None = None) -> Future:
        """Queue one batch and return a ``concurrent.futures.Future`` of its outputs. Safe from any thread; the
        feeds are checked here (an :class:`InputError` is raised at once), and a full queue raises
        :class:`OverloadedError` at once. Requests that wait together may be joined (``max_batch_size``)."""
        self.start(feeds)
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
        self.start(feeds)
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
        if self._pending is not None:  # a model file: planned at the first batch's sizes
            batches = iter(batches)
            first = next(batches, None)
            if first is None:
                return
            self.start(first)
            batches = itertools.chain([first], batches)
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

    def _check_request(self, feeds) -> None:
        _check_feeds(feeds, self.plan.inputs)

    def _meter(self, progress: Progress | None) -> Meter:
        return Meter([s.tensor_parallel for s in self.plan.stages], progress)

    def _summarise(self, meter: Meter) -> None:
        stats = replace(meter.summary(self.config.replicas), model=self.plan.model)
        with self._tally_lock:
            self.stats = stats
            for s in stats.stages:
                self.busy_s[s.stage] += s.busy_s
        self.cost.observe(stats)

    def _request(self, feeds, micro_batch_size, meter: Meter, index: int, *, single: bool,
                 timeout_s: float | None = None) -> Request:
        """Check ``feeds`` (in the caller's thread: bad input never reaches the queue) and queue them."""
        check_size_option(micro_batch_size, InputError)
        if self._coordinator is None:
            raise WorkerError("the pipeline is closed")
        self._check_request(feeds)
        samples = microbatch.batch_size(feeds, self.axes)  # the memory check waits for the split (_prepare)
        timeout_s = timeout_s if timeout_s is not None else self.config.run_timeout_s
        key = None if self.coupled else join_key(feeds, self.axes)  # a coupled model's requests never join
        request = Request(feeds, samples, key, micro_batch_size=micro_batch_size,
                          meter=meter, index=index, single=single, timeout_s=timeout_s,
                          deadline=None if timeout_s is None else time.perf_counter() + timeout_s)
        self._coordinator.put(request)
        return request


def _check_feeds(feeds, inputs) -> None:
    if not isinstance(feeds, dict):
        raise InputError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
    check_feeds(feeds, inputs, where="model")


def _wait(future: Future):
    """A future's result, waiting in short slices so Ctrl-C reaches the caller at once; the coordinator's
    deadlines make sure it is resolved."""
    while True:
        try:
            return future.result(timeout=0.5)
        except FutureTimeout:
            continue


def _check_tensors_only(plan: Plan) -> None:
    """A pipeline carries tensors (as Arrow) between processes: refuse a model whose own inputs or outputs are
    sequences, maps or optionals, or tensors of an element type Arrow cannot carry (float8, int4...), naming them."""
    odd = [f"{kind} {t.name!r}" for kind, specs in (("input", plan.inputs), ("output", plan.outputs))
           for t in specs if t.dtype == NON_TENSOR]
    if odd:
        raise PlanError(f"the model's {', '.join(odd)} {'is' if len(odd) == 1 else 'are'} not a plain tensor (a "
                        "sequence, map or optional, or an element type such as float8 or int4), which a Pipeline "
                        "cannot carry between processes; run it in one process with onnxshard.backend.prepare(model)")

"""The coordinator: start stage workers on Ray and stream micro-batches through them.

Micro-batch ``i`` goes to replica ``i % R``. Two transports carry it from stage to stage:

- ``direct`` (chosen by ``"auto"`` when every worker runs on the coordinator's node and no stage is
  tensor-parallel): each replica's workers are linked into a chain of Unix sockets, coordinator -> stage 0 -> ...
  -> coordinator, carrying Arrow IPC frames (``distributed/links.py``, ``workers/link.py``); a hop costs a socket
  copy instead of a Ray actor call.
- ``ray``: per micro-batch a chain of actor calls whose ObjectRefs pass straight from stage to stage, so
  activations never come through the coordinator. Works across nodes and for tensor-parallel stages.

At most ``max_in_flight`` micro-batches are in the pipeline at once, and results are taken oldest first, so they
come back in order and memory stays flat over an unbounded stream.

Recovery: Ray retries nothing (actors and calls have no retries, since a retried call can run twice and out of
order). The coordinator holds every in-flight micro-batch's ObjectRefs stage by stage, so when a worker dies (or
hangs past ``call_timeout_s`` and is killed) it starts a replacement in the same placement-group bundle and replays
each affected micro-batch from the last stage input that still exists. Over direct links, a dead worker breaks its
replica's chain: the coordinator finds it, replaces it, relinks the replica and resends every micro-batch of that
replica it has not got back. A result is stored once per micro-batch id, so nothing is lost or repeated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from onnxshard.distributed import cluster, microbatch
from onnxshard.distributed.limits import RestartBudget, call_deadline
from onnxshard.distributed.links import DirectLinks, LinkBroken
from onnxshard.distributed.requests import Request, RequestQueue, join_key
from onnxshard.distributed.stats import CostMeter, Meter, RunStats
from onnxshard.errors import ClusterError, InputError, OnnxShardError, PlanError, WorkerError
from onnxshard.plans import Plan, human_bytes, is_plan_dir, spec_bytes
from onnxshard.runtime import RuntimeConfig, arrow
from onnxshard.runtime.session import check_feeds, feed_dims
from onnxshard.workers import Failure, StageWorker

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
HISTORY = 100  # entries kept in pipe.recoveries, pipe.skipped, pipe.retired


@dataclass(frozen=True)
class PipelineConfig:
    """How a plan runs on Ray.

    micro_batch_size: samples per micro-batch; ``"auto"`` (the default) sizes them from measured stage costs (see
        ``Pipeline.auto_micro_batch_size``; the first batch is split as ``None`` does); ``None`` splits each batch
        into about 4 x stages x replicas.
    call_overhead_s: what one actor call costs beyond its compute, for ``"auto"`` until a run has measured it
        (2 ms: measured on a 2-core machine, benchmarks/RESULTS.md).
    replicas: data-parallel copies of the whole pipeline; micro-batches are dealt round robin.
    cpus_per_stage / gpus_per_stage / resources: what each stage worker asks Ray for (one placement-group
        bundle each); ORT's intra-op threads follow the CPUs.
    max_in_flight: micro-batches in the pipeline at once (default 2 x stages x replicas).
    placement_timeout_s: how long to wait for the cluster to grant the workers' resources (a cluster that can
        never grant them, and does not autoscale, is refused at once).
    connect_timeout_s: how long a given Ray address may take to answer before the pipeline gives up on it.
    batch_axes: the batch axis per input/output name, or the symbolic dim name of the batch; inferred if None.
    max_batch_bytes: refuse a batch whose in-flight activations or outputs would need more bytes than this
        (default: 80% of Ray's object store memory).
    max_restarts / restart_window_s: times each worker may be replaced after dying, hanging or running out of
        memory within any ``restart_window_s`` seconds (10 minutes) before the requests in flight fail; rare
        crashes over weeks never add up, a crash loop fails fast.
    max_retries: times one micro-batch may be replayed after losing a worker before its batch fails.
    call_timeout_s: a stage call running longer than this counts as a hung worker: it is killed and replaced.
        ``None`` (the default) derives it from measured stage times: 20 x the slowest call so far (or the fitted
        time of the micro-batch), at least 30 s, and 300 s before anything is measured (see ``limits``).
    max_batch_size: dynamic batching: requests waiting together (from many callers) are joined into one batch of
        up to this many samples before it is cut into micro-batches; each caller gets back exactly its rows.
        ``None`` (the default) never joins requests (a model whose samples depend on each other stays exact).
    max_queue_delay_ms: with ``max_batch_size``, how long an idle pipeline waits for more requests to join the
        oldest (default 0: a busy pipeline still joins what piles up meanwhile).
    max_queue_size: requests that may wait; past it a request is refused at once with ``OverloadedError``.
    transport: how micro-batches travel between stages: ``"direct"`` (Unix sockets between the workers, Arrow IPC
        frames; every worker on the coordinator's node, no tensor-parallel stage), ``"ray"`` (actor calls chained
        by ObjectRef; any cluster) or ``"auto"`` (direct where it applies, else ray).
    run_timeout_s: a request (a ``run``, or each batch of a ``stream``) not back this long after it was queued
        fails (its micro-batches finish and are dropped).
    worker_start_timeout_s: how long a (re)started worker may take to load its shard.
    """

    micro_batch_size: int | str | None = "auto"
    call_overhead_s: float = 0.002
    replicas: int = 1
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_in_flight: int | None = None
    placement_timeout_s: float = 60.0
    connect_timeout_s: float = 30.0
    placement_strategy: str = "PACK"
    batch_axes: dict[str, int | None] | str | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    max_batch_bytes: int | None = None
    max_restarts: int = 3
    restart_window_s: float = 600.0
    max_retries: int = 3
    call_timeout_s: float | None = None
    run_timeout_s: float | None = None
    max_batch_size: int | None = None
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1000
    worker_start_timeout_s: float = 120.0
    transport: str = "auto"


TRANSPORTS = ("auto", "direct", "ray")


@dataclass(eq=False)
class Group:
    """Requests joined into one batch (one request, unless dynamic batching joined several): its outputs are put
    together as its micro-batches come back, then cut back into each request's rows (``sizes``)."""

    requests: list[Request]
    assembly: microbatch.Assembly
    sizes: list[int]
    failed: bool = False  # its callers have their error: later results are dropped
    deadline: float | None = None

    def __post_init__(self):
        deadlines = [r.deadline for r in self.requests if r.deadline is not None]
        self.deadline = min(deadlines) if deadlines else None
        self.meters = list({id(r.meter): r.meter for r in self.requests if r.meter is not None}.values())


@dataclass
class Flight:
    """One micro-batch in the pipeline: ``refs[k]`` is stage k's input packet, ``refs[k + 1]`` its output."""

    group: Group
    part: int
    id: int
    replica: int
    refs: list
    replays: int = 0
    submitted: float = 0.0
    samples: int = 1
    inner: dict[int, list] = field(default_factory=dict)  # refs between the steps of tensor-parallel stages


@dataclass(frozen=True)
class Recovery:
    """A worker replaced during a run."""

    stage: int
    replica: int
    cause: str
    seconds: float
    replayed: int


@dataclass(frozen=True)
class Skipped:
    """A batch left out of a ``stream(on_error="skip")`` because one of its micro-batches failed on its data."""

    request: int
    micro_batch: int
    stage: int
    message: str


class Pipeline:
    """A plan running as Ray actors, one per stage per replica. Use as a context manager::

        with onnxshard.Pipeline("plan/", micro_batch_size=4) as pipe:
            outputs = pipe.run({"x": x})
    """

    def __init__(self, plan: Plan | str | os.PathLike, *, stages: int | None = None,
                 address: str | None = None, config: PipelineConfig | None = None, **options):
        self.config = replace(config or PipelineConfig(), **options)
        _check_config(self.config)  # before Ray starts (seconds), so a typo costs nothing
        self._tmp: Path | None = None
        self.plan = self._resolve_plan(plan, stages)
        self.axes = microbatch.infer_batch_axes(self.plan, self.config.batch_axes)
        self._input_types = {t.name: t.dtype for t in self.plan.inputs}  # per micro-batch: look up once
        self._output_names = self.plan.output_names
        self._owns_ray = False
        self._pg = None
        self.workers: list[list[list]] = []  # [replica][stage][rank]
        self.worker_info: list[list[list[dict]]] = []
        self.restarts: dict[tuple[int, int], int] = {}  # every restart of each worker, for the record
        # the histories keep their last entries only: a pipeline may serve for weeks
        self.recoveries: deque[Recovery] = deque(maxlen=HISTORY)
        self.skipped: deque[Skipped] = deque(maxlen=HISTORY)
        self.retired: deque = deque(maxlen=HISTORY)  # replaced workers, killed again at close()
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
        self._doomed: list = []  # refs of calls a replay replaced
        self._in_flight_gauge = None
        self._links: DirectLinks | None = None
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
        cfg, k, count = self.config, self.plan.num_stages, self.plan.num_workers * self.config.replicas
        bundle = {"CPU": cfg.cpus_per_stage, **({"GPU": cfg.gpus_per_stage} if cfg.gpus_per_stage else {}),
                  **cfg.resources}
        bundle = {key: v for key, v in bundle.items() if v}
        never = cluster.infeasible([bundle] * count, cluster.node_totals(), cfg.placement_strategy)
        if never and (self._owns_ray or not cluster.autoscales()):  # waiting cannot help: say so now
            raise ClusterError(f"the cluster can never place {count} stage workers of {bundle} ({never}); add "
                               "nodes, lower cpus_per_stage/gpus_per_stage/replicas, or use fewer stages")
        self._pg = placement_group([dict(bundle) for _ in range(count)], strategy=cfg.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=cfg.placement_timeout_s)
        except GetTimeoutError:
            raise ClusterError(self._unsatisfiable(bundle, count)) from None
        self.workers = [[self._spawn_stage(r, s) for s in range(k)] for r in range(cfg.replicas)]
        self.worker_info = [[self._await_ready(ranks) for ranks in row] for row in self.workers]
        self.transport = self._choose_transport()
        if self.transport == "direct":
            self._links = self._link(lambda: DirectLinks(self.workers, cfg.worker_start_timeout_s, self._window()))
        self._byte_limit = cfg.max_batch_bytes or int(0.8 * ray.available_resources().get("object_store_memory",
                                                                                           2**62))
        from ray.util.metrics import Gauge

        self._in_flight_gauge = Gauge("onnxshard_pipeline_in_flight", "micro-batches in the pipeline (queue depth)")

    def _spawn_stage(self, replica: int, stage: int) -> list:
        """Start a stage's workers (one per tensor-parallel rank), each in its own placement-group bundle."""
        cfg = self.config
        first = replica * self.plan.num_workers + sum(s.tensor_parallel for s in self.plan.stages[:stage])
        return [ray.remote(StageWorker).options(
            num_cpus=cfg.cpus_per_stage, num_gpus=cfg.gpus_per_stage, resources=cfg.resources or None,
            max_restarts=0, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=first + rank),
        ).remote(str(self.plan.root), stage, cfg.runtime, rank) for rank in range(self.plan.stages[stage].tensor_parallel)]

    def _choose_transport(self) -> str:
        """``direct`` where it applies (see PipelineConfig.transport), else ``ray``."""
        wanted = self.config.transport
        if wanted == "ray":
            return "ray"
        here = ray.get_runtime_context().get_node_id()
        why = None
        if any(s.steps for s in self.plan.stages):
            why = "a tensor-parallel stage exchanges values between its ranks through Ray"
        elif any(w["node"] != here for row in self.worker_info for ranks in row for w in ranks):
            why = "some workers run on other nodes than the coordinator (direct links are Unix sockets)"
        elif not hasattr(socket, "AF_UNIX"):
            why = "this platform has no Unix sockets"
        if why is None:
            return "direct"
        if wanted == "direct":
            raise PlanError(f"transport 'direct' cannot be used here: {why}; use transport='ray' or 'auto'")
        return "ray"

    def _link(self, make):
        """Link workers (``make()``), turning a failure into a WorkerError that says what to do."""
        try:
            return make()
        except (OSError, GetTimeoutError, RayActorError) as e:
            raise WorkerError(f"could not link the stage workers over Unix sockets ({_cause(e)}); use "
                              "transport='ray'") from None

    def _await_ready(self, workers: list) -> list[dict]:
        try:
            info = ray.get([w.ready.remote() for w in workers], timeout=self.config.worker_start_timeout_s)
            warm = [i["warm_s"] for i in info if i.get("warm_s") is not None]
            if warm:  # a first measurement for the call deadline (a one-sample first run: on the slow side)
                self._slowest_s = max([self._slowest_s or 0.0, *warm])
            return info
        except RayActorError as e:
            raise WorkerError(f"a stage worker failed to start: {_cause(e)}") from None
        except GetTimeoutError:
            raise WorkerError(f"stage workers did not load their shards within {self.config.worker_start_timeout_s:g} "
                              "s; raise worker_start_timeout_s for large shards") from None

    def _window(self) -> int:
        """Micro-batches in the pipeline at once."""
        return self.config.max_in_flight or 2 * self.plan.num_stages * self.config.replicas

    def _unsatisfiable(self, bundle: dict, count: int) -> str:
        total = ray.cluster_resources()
        free = ray.available_resources()
        need = {key: v * count for key, v in bundle.items()}
        short = "; ".join(f"{key}: need {v:g}, cluster has {total.get(key, 0):g} ({free.get(key, 0):g} free)"
                          for key, v in need.items() if total.get(key, 0) < v or free.get(key, 0) < v)
        return (f"the cluster cannot place {count} stage workers of {bundle} within "
                f"{self.config.placement_timeout_s:g} s ({short or 'resources are busy'}); add nodes, lower "
                "cpus_per_stage/gpus_per_stage/replicas, or use fewer stages")

    def close(self) -> None:
        """Fail what is still queued or in flight, stop the workers, free their placement group, and shut Ray
        down if this pipeline started it."""
        self._closing = True
        for request in self._queue.close():
            if not request.future.done():
                request.future.set_exception(WorkerError("the pipeline is closed"))
        if self._links is not None:
            self._links.close()  # wakes the coordinator's thread if it waits on a link
        for w in [w for row in self.workers for ranks in row for w in ranks] + list(self.retired):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # woken by the closed links or the killed workers, it fails what was
            self._thread = None  # in flight and ends
        self._links = None
        self.workers = []
        self.retired.clear()
        self._outputs.close()
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None
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
        _check_size_option(micro_batch_size, InputError)
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
        _check_size_option(micro_batch_size, InputError)
        if not self.workers or self._closing:
            raise WorkerError("the pipeline is closed")
        self._check_request(feeds)
        samples = microbatch.batch_size(feeds, self.axes)  # the memory check waits for the split (_prepare)
        timeout_s = timeout_s if timeout_s is not None else self.config.run_timeout_s
        request = Request(feeds, samples, join_key(feeds, self.axes), micro_batch_size=micro_batch_size,
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
        group = Group(live, microbatch.Assembly([microbatch.batch_size(c, self.axes) for c in chunks], self.axes,
                                                self._outputs), sizes)
        for meter in group.meters:
            meter.samples += sum(r.samples for r in live if r.meter is meter)
        self._backlog.extend((group, part, chunk) for part, chunk in enumerate(chunks))

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
        links = self._links
        if links is not None:
            links.forget()
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
        sample_bytes = self._sample_bytes(feeds)
        if size == "auto":
            size = None if self.axes is None else self.auto_micro_batch_size(
                total, stream_sample_bytes=None if single else sample_bytes[0], requests=requests, slot=slot)
        if size is None and self.axes is not None:
            size = max(1, -(-total // (4 * self.plan.num_stages * self.config.replicas)))
        count = 1 if self.axes is None or not size else -(-total // size)
        self._check_size(sample_bytes, total, count)
        return microbatch.split(feeds, self.axes, size), total

    def _check_request(self, feeds) -> None:
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
        check_feeds(feeds, self.plan.inputs, where="model")

    def auto_micro_batch_size(self, total: int, *, stream_sample_bytes: int | None = None, requests: int = 1,
                              slot=None) -> int | None:
        """Samples per micro-batch for a batch of ``total`` samples, from the stage costs measured so far.

        With K stages, micro-batches of s samples, M = ceil(B / s) of them per replica for B samples per replica,
        a batch alone (``run``) takes about (M + K - 1)(t(s) + o): the pipeline fills and drains (K - 1 extra
        slots), each slot lasts the slowest stage's compute t(s) (a line a + b s fitted to the measured
        micro-batches: a is what a call costs whatever its size, such as an LSTM's sequential steps) plus the
        per-call overhead o (measured from the runs so far; ``call_overhead_s`` before that). The size chosen
        minimises that.

        The ``requests``-th batch of a stream shares the fill and drain with the batches before it, so the size
        minimises (n M + K - 1)(t(s) + o) for the n = ``requests`` batches so far: a short stream of big batches
        splits them as ``run`` does, a long stream of small requests tends to one micro-batch per request. In a
        stream (``stream_sample_bytes``: a sample's bytes at the widest stage boundary) the size is also capped
        so the micro-batches in flight hold at most a quarter of ``max_batch_bytes``. ``slot``: the fitted t(s)
        (``CostMeter.slot_model()``), to fit once per stream rather than per batch.

        ``None`` until a first batch has been measured (the default split applies)."""
        if not self.cost.measured:
            return None
        k, replicas = self.plan.num_stages, self.config.replicas
        per_replica = max(1, -(-total // replicas))
        largest = per_replica
        if stream_sample_bytes is not None:
            in_flight = stream_sample_bytes * (k + 1) * self._window()
            largest = max(1, min(per_replica, int(self._byte_limit / 4 // max(1, in_flight))))
        o = self.cost.overhead_s if self.cost.overhead_s is not None else self.config.call_overhead_s
        slot = slot or self.cost.slot_model()
        # one candidate per count of micro-batches (up to 512 of them): the smallest size giving that count
        sizes = {min(largest, -(-per_replica // m)) for m in range(1, min(per_replica, 512) + 1)}
        return min(sorted(sizes), key=lambda s: (requests * -(-per_replica // s) + k - 1) * (slot(s) + o))

    def _sample_bytes(self, feeds) -> tuple[int, int]:
        """Bytes one sample of ``feeds`` takes at the widest stage boundary, and in the outputs."""
        dims = feed_dims(feeds, self.plan.inputs)
        if self.axes is not None:  # per sample: the batch dim counts once
            for t in self.plan.inputs:
                axis = self.axes.inputs.get(t.name)
                if axis is not None and t.shape and isinstance(t.shape[axis], str):
                    dims[t.shape[axis]] = 1

        def sample_bytes(names):
            return sum(spec_bytes(self.plan.spec(n), dims) for n in names)

        return (max(sample_bytes(s.output_names + list(s.carry)) for s in self.plan.stages),
                sample_bytes(self.plan.output_names))

    def _check_size(self, sample_bytes: tuple[int, int], total: int, count: int) -> None:
        """Refuse a batch that would not fit, saying how much it needs, instead of exhausting memory.
        ``sample_bytes``: a sample's bytes at the widest stage boundary and in the outputs."""
        per_sample, out_per_sample = sample_bytes
        samples = total if self.axes is not None else 1
        window = min(count, self._window())
        in_flight = window * -(-samples // count) * per_sample * (self.plan.num_stages + 1)
        outputs = samples * out_per_sample
        limit = self._byte_limit
        need = max(in_flight, outputs)
        if need > limit:
            raise InputError(f"this batch would need about {human_bytes(need)} ({human_bytes(in_flight)} of "
                             f"activations in flight, {human_bytes(outputs)} of outputs), over the "
                             f"{human_bytes(limit)} allowed; send smaller batches or micro-batches, or raise "
                             "max_batch_bytes / Ray's object store memory")

    def _submit(self, group: Group, part: int, chunk: dict[str, np.ndarray]) -> Flight:
        mb = self._next_id
        self._next_id += 1
        batch = arrow.encode(chunk, self._input_types)
        # refs[0] is the packet itself: Ray sends it inline (or stores it) with the call, and a replay resends it.
        flight = Flight(group, part, mb, mb % self.config.replicas, [(batch, ())],
                        samples=microbatch.batch_size(chunk, self.axes), submitted=time.monotonic())
        for meter in group.meters:
            meter.micro_batches += 1
        if self._links is None:
            self._launch(flight, 0)
            return flight
        try:
            self._links.send(flight.replica, flight.id, flight.refs[0])
        except LinkBroken:
            pass  # found when the coordinator waits for this micro-batch: it relinks and resends then
        return flight

    def _launch(self, flight: Flight, start: int) -> None:
        """(Re)issue stage calls ``start..K-1`` for ``flight``, chaining each output into the next stage. A
        tensor-parallel stage is a chain of steps: every rank's step-``j`` packet goes to every rank's step
        ``j + 1`` (refs only: the ranks read each other's values from the object store, not through here)."""
        self._doomed += flight.refs[start + 1:]
        del flight.refs[start + 1:]
        for stage in [s for s in flight.inner if s >= start]:
            self._doomed += flight.inner.pop(stage)
        flight.submitted = time.monotonic()
        row = self.workers[flight.replica]
        for stage in range(start, self.plan.num_stages):
            ranks, steps = row[stage], self.plan.stages[stage].steps
            if not steps:
                flight.refs.append(ranks[0].run.remote(flight.refs[stage], flight.id))
                continue
            packets, inner = [flight.refs[stage]], []
            for j, step in enumerate(steps):
                packets = [ranks[r].run_step.remote(j, flight.id, *packets) for r in range(step.ranks)]
                inner += packets
            flight.inner[stage] = inner[:-1]
            flight.refs.append(packets[0])

    def _finish_oldest(self) -> None:
        """Wait for the oldest micro-batch, recovering lost workers on the way; store its result once, and hand a
        batch's outputs to its callers when its last micro-batch is in."""
        self._drain_doomed()
        window = self._window_flights
        flight = window[0]
        try:
            result, stats = self._wait_direct(flight, window) if self._links else self._wait_ray(flight, window)
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
        if group.assembly.add(flight.part, arrow.decode(result, self._output_names, writable=self._links is not None)):
            for meter in group.meters:
                meter.delivered += 1
        if group.assembly.done:
            self._deliver(group)

    def _wait_ray(self, flight: Flight, window: deque[Flight]) -> tuple:
        while True:
            try:  # a blocking get; ray.wait costs ~1 ms of driver CPU per call here
                result = ray.get(flight.refs[-1], timeout=self._wait_budget(flight))
            except GetTimeoutError:
                self._on_timeout(flight, window)
                continue
            except (RayActorError, RayTaskError, ObjectLostError) as e:
                self._recover(flight, window, cause=_cause(e), stage=self._dead_stage(flight.replica, e))
                continue
            if not _resource_failure(result[0]):
                return result
            # out of memory, a device error: not the data's fault; a fresh worker runs it again
            self._recover(flight, window, cause=result[0].message, stage=result[0].stage, force=flight)

    def _wait_direct(self, flight: Flight, window: deque[Flight]) -> tuple:
        while True:
            try:
                result = self._links.take(flight.replica, flight.id, self._wait_budget(flight))
            except TimeoutError:
                self._on_timeout(flight, window)
                continue
            except LinkBroken as e:
                self._relink(flight.replica, window, cause=f"direct link broken ({e})")
                continue
            if not _resource_failure(result[0]):
                return result
            self._relink(flight.replica, window, cause=result[0].message, dead=[result[0].stage])

    def _drain_doomed(self) -> None:
        """Read the errors of calls abandoned by a replay, once they settle, so Ray does not log them as unhandled."""
        if not self._doomed:
            return
        ready, self._doomed = ray.wait(self._doomed, num_returns=len(self._doomed), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:
                pass

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
        cause = f"hung for over {limit:g} s (call deadline)"
        if self._links is not None:
            hung = self._unresponsive(flight.replica, busy_over=limit)
            if hung:  # else the micro-batch is only queued behind slow ones: keep waiting
                self._relink(flight.replica, window, cause=cause, dead=hung)
            return
        stage = self._first_unfinished(flight)
        log.warning("stage %d (replica %d) has run micro-batch %d for over %gs: killing it as hung",
                    stage, flight.replica, flight.id, limit)
        for worker in self.workers[flight.replica][stage]:
            ray.kill(worker, no_restart=True)
        self._recover(flight, window, cause=cause, stage=stage)

    def _dead_stage(self, replica: int, error: Exception) -> int:
        """The stage of ``replica`` whose worker died: named by the error, else found by asking each worker."""
        dead_id = _dead_actor_id(error)
        workers = [(stage, w) for stage, ranks in enumerate(self.workers[replica]) for w in ranks]
        for stage, worker in workers:
            if dead_id is not None and worker._actor_id.hex() == dead_id:
                return stage
        probes = [w.__ray_ready__.remote() for _, w in workers]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=5)
        for (stage, _), probe in zip(workers, probes):
            if probe in ready:
                try:
                    ray.get(probe)
                except Exception:
                    return stage
        raise WorkerError(f"a stage worker of replica {replica} failed ({_cause(error)}) but none is found dead")

    def _first_unfinished(self, flight: Flight) -> int:
        """The first stage whose call for ``flight`` has not finished successfully."""
        for stage, st in enumerate(flight.refs[1:]):
            ready, _ = ray.wait([st], timeout=0)
            if not ready:
                return stage
            try:
                ray.get(st)
            except (RayActorError, RayTaskError, ObjectLostError):
                return stage
        return len(flight.refs) - 2

    def _recover(self, flight: Flight, window: deque[Flight], *, cause: str, stage: int | None = None,
                 force: Flight | None = None) -> None:
        """Replace the dead worker of ``flight``'s replica and replay every in-flight micro-batch it lost
        (``force``: also this one, which finished, but with a resource failure at ``stage``)."""
        t0 = time.perf_counter()
        stage = self._first_unfinished(flight) if stage is None else stage
        self._replace_stage(flight.replica, stage, cause, flight.id)
        replayed = 0
        for other in window:  # oldest first, so the new worker gets them in order
            if other.replica != flight.replica:
                continue
            if other is not force and (self._first_unfinished(other) > stage or self._finished(other)):
                continue  # already past the dead worker
            self._count_replay(other, cause, stage)
            # Stage ``stage``'s input is made (or being made) by a live worker: only the lost calls are reissued.
            self._launch(other, stage)
            replayed += 1
        self.recoveries.append(Recovery(stage, flight.replica, cause, time.perf_counter() - t0, replayed))

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
        old = self.workers[replica][stage]
        self.retired += old
        for worker in old:  # a tensor-parallel stage restarts all its ranks: they run each micro-batch together
            try:
                ray.kill(worker, no_restart=True)
            except Exception:
                pass
        log.warning("stage %d worker (replica %d) lost (%s); starting a replacement", stage, replica, cause)
        new = self._spawn_stage(replica, stage)
        self.workers[replica][stage] = new
        self.worker_info[replica][stage] = self._await_ready(new)

    def _unresponsive(self, replica: int, busy_over: float | None = None, probe_s: float = 2.0) -> list[int]:
        """Stages of ``replica`` whose worker is dead, does not answer within ``probe_s``, or (``busy_over``) has
        been computing one micro-batch for longer than that."""
        probes = [ranks[0].busy_seconds.remote() for ranks in self.workers[replica]]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=probe_s)
        lost = []
        for stage, probe in enumerate(probes):
            try:
                busy = ray.get(probe) if probe in ready else None
            except (RayActorError, RayTaskError):
                busy = None
            if busy is None or (busy_over is not None and busy > busy_over):
                lost.append(stage)
        return lost

    def _relink(self, replica: int, window: deque[Flight], *, cause: str, dead: list[int] | None = None) -> None:
        """Direct transport: replace ``replica``'s dead workers (found by probing if not given), link the replica
        again and resend each of its in-flight micro-batches that has not come back."""
        t0 = time.perf_counter()
        dead = self._unresponsive(replica) if dead is None else dead
        for stage in dead:
            self._replace_stage(replica, stage, cause)
        self._doomed += self._link(lambda: self._links.connect(replica, self.workers[replica]))
        stage = dead[0] if dead else None  # the first stage lost (None: the link broke with every worker alive)
        replayed = 0
        for flight in window:
            if flight.replica != replica or self._links.has(flight.id):
                continue
            self._count_replay(flight, cause, stage)
            flight.submitted = time.monotonic()
            try:
                self._links.send(replica, flight.id, flight.refs[0])
            except LinkBroken:
                break  # the new chain broke too: the next wait finds out and relinks again
            replayed += 1
        self.recoveries.append(Recovery(-1 if stage is None else stage, replica, cause, time.perf_counter() - t0,
                                        replayed))

    def _finished(self, flight: Flight) -> bool:
        ready, _ = ray.wait([flight.refs[-1]], timeout=0)
        if not ready:
            return False
        try:
            ray.get(flight.refs[-1])
            return True
        except (RayActorError, RayTaskError, ObjectLostError):
            return False

    def _fail_data(self, group: Group, flight: Flight, failure: Failure) -> None:
        """ONNX Runtime raised on this micro-batch's data: its batch fails (or is retried request by request, when
        several callers' requests were joined), never retried as it is."""
        prefix = f"stage {failure.stage}, micro-batch {flight.id}"
        message = failure.message if failure.message.startswith(prefix) else f"{prefix}: {failure.message}"
        error = InputError(message) if failure.kind == "InputError" else \
            WorkerError(message, stage=failure.stage, micro_batch=flight.id)
        group.failed = True
        self._fail_requests(group.requests, error, failure=(flight.id, failure.stage, message))


def _check_config(cfg: PipelineConfig) -> None:
    """Refuse options no pipeline can run with, naming the option."""
    def number(name, low, *, strict=True, none_ok=False, whole=False):
        value = getattr(cfg, name)
        if value is None and none_ok:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and \
            value < float("inf") and (value > low if strict else value >= low) and (not whole or value == int(value))
        if not ok:
            kind = "a whole number" if whole else "a number"
            raise PlanError(f"{name} must be {kind} {'over' if strict else 'of at least'} {low:g} (got {value!r})")

    number("replicas", 1, strict=False, whole=True)
    number("cpus_per_stage", 0)
    number("gpus_per_stage", 0, strict=False)
    number("max_in_flight", 1, strict=False, none_ok=True, whole=True)
    number("max_restarts", 0, strict=False, whole=True)
    number("max_retries", 0, strict=False, whole=True)
    for name in ("placement_timeout_s", "connect_timeout_s", "worker_start_timeout_s"):
        number(name, 0)
    for name in ("call_timeout_s", "run_timeout_s", "max_batch_bytes"):
        number(name, 0, none_ok=True)
    _check_size_option(cfg.micro_batch_size, PlanError)
    if cfg.transport not in TRANSPORTS:
        raise PlanError(f"transport must be one of {TRANSPORTS} (got {cfg.transport!r})")
    if cfg.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise PlanError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD "
                        f"(got {cfg.placement_strategy!r})")


def _wait(future: Future):
    """A future's result, waiting in short slices so Ctrl-C reaches the caller at once; the coordinator's
    deadlines make sure it is resolved."""
    while True:
        try:
            return future.result(timeout=0.5)
        except FutureTimeout:
            continue


def _resource_failure(result) -> bool:
    return isinstance(result, Failure) and result.kind == "ResourceError"


def _check_size_option(size, error: type[Exception]) -> None:
    if size is None or size == "auto":
        return
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise error(f"micro_batch_size must be a positive integer or 'auto' (got {size!r})")


def _dead_actor_id(error: Exception) -> str | None:
    """The hex id of the actor whose death caused ``error`` (Ray wraps it when a later stage needed its output)."""
    while error is not None:
        if isinstance(error, RayActorError) and getattr(error, "actor_id", None):
            return error.actor_id
        error = getattr(error, "cause", None)
    return None


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or getattr(e, "error_msg", None) or e
    if isinstance(cause, OnnxShardError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(e).__name__

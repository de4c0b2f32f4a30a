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

import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from onnxshard.distributed import microbatch
from onnxshard.distributed.links import DirectLinks, LinkBroken
from onnxshard.distributed.stats import CostMeter, RunStats, Tally
from onnxshard.errors import InputError, OnnxShardError, PlanError, WorkerError
from onnxshard.plan import Plan, human_bytes, is_plan_dir, spec_bytes
from onnxshard.runtime import RuntimeConfig, arrow
from onnxshard.runtime.session import check_feeds, feed_dims
from onnxshard.workers import Failure, StageWorker

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]

# For a Ray this pipeline starts itself: activations up to 4 MiB travel inline with the call's reply instead of
# through the shared-memory object store, 8-11% more throughput on the benchmarks (benchmarks/RESULTS.md).
LOCAL_RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 4 << 20}


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
    placement_timeout_s: how long to wait for the cluster to grant the workers' resources.
    batch_axes: the batch axis per input/output name, or the symbolic dim name of the batch; inferred if None.
    max_batch_bytes: refuse a batch whose in-flight activations or outputs would need more bytes than this
        (default: 80% of Ray's object store memory).
    max_restarts: times each worker may be replaced after dying (or hanging) before the run fails.
    max_retries: times one micro-batch may be replayed after losing a worker before the run fails.
    call_timeout_s: a stage call running longer than this counts as a hung worker: it is killed and replaced.
    transport: how micro-batches travel between stages: ``"direct"`` (Unix sockets between the workers, Arrow IPC
        frames; every worker on the coordinator's node, no tensor-parallel stage), ``"ray"`` (actor calls chained
        by ObjectRef; any cluster) or ``"auto"`` (direct where it applies, else ray).
    run_timeout_s: a whole ``run``/``stream`` call taking longer than this fails.
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
    placement_strategy: str = "PACK"
    batch_axes: dict[str, int | None] | str | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    max_batch_bytes: int | None = None
    max_restarts: int = 3
    max_retries: int = 3
    call_timeout_s: float | None = None
    run_timeout_s: float | None = None
    worker_start_timeout_s: float = 120.0
    transport: str = "auto"


TRANSPORTS = ("auto", "direct", "ray")


@dataclass
class Flight:
    """One micro-batch in the pipeline: ``refs[k]`` is stage k's input packet, ``refs[k + 1]`` its output."""

    request: int
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
        if self.config.replicas < 1:
            raise PlanError(f"replicas must be at least 1 (got {self.config.replicas})")
        _check_size_option(self.config.micro_batch_size, PlanError)
        if self.config.transport not in TRANSPORTS:
            raise PlanError(f"transport must be one of {TRANSPORTS} (got {self.config.transport!r})")
        self._tmp: Path | None = None
        self.plan = self._resolve_plan(plan, stages)
        self.axes = microbatch.infer_batch_axes(self.plan, self.config.batch_axes)
        self._input_types = {t.name: t.dtype for t in self.plan.inputs}  # per micro-batch: look up once
        self._output_names = self.plan.output_names
        self._owns_ray = False
        self._pg = None
        self.workers: list[list[list]] = []  # [replica][stage][rank]
        self.worker_info: list[list[list[dict]]] = []
        self.restarts: dict[tuple[int, int], int] = {}
        self.recoveries: list[Recovery] = []
        self.skipped: list[Skipped] = []
        self.retired: list = []  # replaced workers, killed again at close()
        self.stats: RunStats | None = None
        self._next_id = 0
        self._delivered = self._replayed = 0
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
            return make_plan(path, self._tmp / "plan", stages=stages or 2)
        raise PlanError(f"{path} is neither a plan folder nor an ONNX model file")

    def _start(self, address: str | None) -> None:
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True, configure_logging=True,
                     _system_config=None if address else LOCAL_RAY_SYSTEM_CONFIG)
            self._owns_ray = True
        cfg, k, count = self.config, self.plan.num_stages, self.plan.num_workers * self.config.replicas
        bundle = {"CPU": cfg.cpus_per_stage, **({"GPU": cfg.gpus_per_stage} if cfg.gpus_per_stage else {}),
                  **cfg.resources}
        bundle = {key: v for key, v in bundle.items() if v}
        self._pg = placement_group([dict(bundle) for _ in range(count)], strategy=cfg.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=cfg.placement_timeout_s)
        except GetTimeoutError:
            raise PlanError(self._unsatisfiable(bundle, count)) from None
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
            return ray.get([w.ready.remote() for w in workers], timeout=self.config.worker_start_timeout_s)
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
        """Stop the workers, free their placement group, and shut Ray down if this pipeline started it."""
        if self._links is not None:
            self._links.close()
            self._links = None
        for w in [w for row in self.workers for ranks in row for w in ranks] + self.retired:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers, self.retired = [], []
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

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], *, micro_batch_size: int | None = None,
            progress: Progress | None = None) -> dict[str, np.ndarray]:
        """Outputs of the whole model for one batch (the same as ONNX Runtime on the unsplit model)."""
        return next(self._stream([feeds], micro_batch_size, progress, "raise", single=True))[1]

    def stream(self, batches: Iterable[dict[str, np.ndarray]], *, micro_batch_size: int | str | None = None,
               progress: Progress | None = None, on_error: str = "raise",
               coalesce: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Results for each batch of ``batches``, in order, with a bounded number of micro-batches in flight.

        ``micro_batch_size`` overrides the pipeline's for these batches; ``progress(done, submitted)`` is called as
        each micro-batch completes. ``on_error="skip"`` leaves out a batch whose micro-batch fails on its data
        (ONNX Runtime raised on it) and lists it in ``self.skipped``; ``"raise"`` raises.

        ``coalesce=N`` batches dynamically, like Triton's dynamic batcher: consecutive requests are joined into
        batches of up to N samples before they are cut into micro-batches, so a stream of small requests makes
        fewer, larger calls; each request still gets its own result, in order. It reads ahead in ``batches`` for
        up to N samples, so use it on streams that are already there (files, queues), not to wait for requests."""
        if not coalesce:
            for _, outputs in self._stream(batches, micro_batch_size, progress, on_error):
                yield outputs
            return
        if self.axes is None:
            raise InputError("coalesce needs the batch axis of every input and output; pass batch_axes")
        groups: list[list[int]] = []

        def joined():
            for feeds, sizes in microbatch.coalesce(batches, self.axes, coalesce, check=self._check_request):
                groups.append(sizes)
                yield feeds

        skipped_before = len(self.skipped)
        try:
            for index, outputs in self._stream(joined(), micro_batch_size, progress, on_error):
                yield from microbatch.unmerge(outputs, self.axes, groups[index])
        finally:  # a skipped joined batch leaves out each request in it
            firsts = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(int)
            self.skipped[skipped_before:] = [replace(s, request=int(r)) for s in self.skipped[skipped_before:]
                                             for r in range(firsts[s.request], firsts[s.request + 1])]

    def _stream(self, batches, micro_batch_size, progress, on_error, *,
                single: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(request index, outputs) for each batch that is not skipped, in order. ``single``: ``batches`` is one
        batch (``run``), whose pipeline fill and drain nothing else overlaps."""
        size = self.config.micro_batch_size if micro_batch_size is None else micro_batch_size
        _check_size_option(size, InputError)
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
        if not self.workers:
            raise WorkerError("the pipeline is closed")
        replicas = self.config.replicas
        window_size = self._window()
        window: deque[Flight] = deque()
        pending: dict[int, microbatch.Assembly | None] = {}  # None: skipped
        order: deque = deque()
        tally = Tally([s.tensor_parallel for s in self.plan.stages])
        samples, count, done, started = 0, 0, 0, time.perf_counter()
        self._delivered, self._replayed = 0, 0
        deadline = started + self.config.run_timeout_s if self.config.run_timeout_s else None

        def finish_oldest():
            nonlocal done
            samples_done = window[0].samples
            calls = self._finish(window, pending, on_error, deadline)
            tally.add(calls)
            self.cost.add(calls, samples_done)
            self._in_flight_gauge.set(len(window))
            done += 1
            if progress:
                progress(done, count)

        slot = self.cost.slot_model() if size == "auto" and self.cost.measured else None  # one fit per stream
        try:
            for request, feeds in enumerate(batches):
                chunks, total = self._prepare(feeds, size, single, request + 1, slot)
                samples += total
                sizes = [microbatch.batch_size(c, self.axes) for c in chunks]
                pending[request] = microbatch.Assembly(sizes, self.axes, self._outputs)
                order.append(request)
                for part, chunk in enumerate(chunks):
                    while len(window) >= window_size:
                        finish_oldest()
                        yield from self._ready(order, pending)
                    window.append(self._submit(part, chunk, request, sizes[part]))
                    count += 1
                    self._in_flight_gauge.set(len(window))
            while window:
                finish_oldest()
                yield from self._ready(order, pending)
        finally:
            if self._links is not None:
                self._links.forget()
            self.stats = tally.summary(replicas=replicas, samples=samples, micro_batches=count,
                                       wall_s=time.perf_counter() - started, delivered=self._delivered,
                                       replayed=self._replayed)
            self.cost.observe(self.stats)

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

    def _submit(self, part: int, chunk: dict[str, np.ndarray], request: int, samples: int) -> Flight:
        mb = self._next_id
        self._next_id += 1
        batch = arrow.encode(chunk, self._input_types)
        # refs[0] is the packet itself: Ray sends it inline (or stores it) with the call, and a replay resends it.
        flight = Flight(request, part, mb, mb % self.config.replicas, [(batch, ())], samples=samples,
                        submitted=time.monotonic())
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

    def _finish(self, window: deque[Flight], pending: dict, on_error: str, deadline: float | None) -> list:
        """Wait for the oldest micro-batch, recovering lost workers on the way; store its result once."""
        self._drain_doomed()
        flight = window[0]
        result, stats = self._wait_direct(flight, window, deadline) if self._links else \
            self._wait_ray(flight, window, deadline)
        calls = [replace(c, replica=flight.replica) for c in stats]
        window.popleft()
        if isinstance(result, Failure):
            self._fail_data(flight, result, pending, on_error)
            return calls
        assembly = pending.get(flight.request)
        if assembly is not None:  # exactly once: a replayed duplicate is dropped
            # a result read off a direct link lies in a buffer of its own: its tensors need no copy
            if assembly.add(flight.part, arrow.decode(result, self._output_names, writable=self._links is not None)):
                self._delivered += 1
        return calls

    def _wait_ray(self, flight: Flight, window: deque[Flight], deadline: float | None) -> tuple:
        while True:
            try:  # a blocking get; ray.wait costs ~1 ms of driver CPU per call here
                return ray.get(flight.refs[-1], timeout=self._wait_budget(deadline))
            except GetTimeoutError:
                self._on_timeout(flight, window, deadline)
            except (RayActorError, RayTaskError, ObjectLostError) as e:
                self._recover(flight, window, cause=_cause(e), stage=self._dead_stage(flight.replica, e))

    def _wait_direct(self, flight: Flight, window: deque[Flight], deadline: float | None) -> tuple:
        while True:
            try:
                return self._links.take(flight.replica, flight.id, self._wait_budget(deadline))
            except TimeoutError:
                self._on_timeout(flight, window, deadline)
            except LinkBroken as e:
                self._relink(flight.replica, window, cause=f"direct link broken ({e})")

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

    def _wait_budget(self, deadline: float | None) -> float | None:
        budgets = [b for b in (self.config.call_timeout_s,
                               None if deadline is None else max(0.0, deadline - time.perf_counter())) if b is not None]
        return min(budgets) if budgets else None

    def _on_timeout(self, flight: Flight, window: deque[Flight], deadline: float | None) -> None:
        if deadline is not None and time.perf_counter() >= deadline:
            raise WorkerError(f"run deadline of {self.config.run_timeout_s:g} s passed with micro-batch {flight.id} "
                              f"still in the pipeline; raise run_timeout_s or check the workers",
                              micro_batch=flight.id)
        if self.config.call_timeout_s is None or time.monotonic() - flight.submitted < self.config.call_timeout_s:
            return
        cause = f"hung for over {self.config.call_timeout_s:g} s (call deadline)"
        if self._links is not None:
            hung = self._unresponsive(flight.replica, busy_over=self.config.call_timeout_s)
            if hung:  # else the micro-batch is only queued behind slow ones: keep waiting
                self._relink(flight.replica, window, cause=cause, dead=hung)
            return
        stage = self._first_unfinished(flight)
        log.warning("stage %d (replica %d) has run micro-batch %d for over %gs: killing it as hung",
                    stage, flight.replica, flight.id, self.config.call_timeout_s)
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

    def _recover(self, flight: Flight, window: deque[Flight], *, cause: str, stage: int | None = None) -> None:
        """Replace the dead worker of ``flight``'s replica and replay every in-flight micro-batch it lost."""
        t0 = time.perf_counter()
        stage = self._first_unfinished(flight) if stage is None else stage
        self._replace_stage(flight.replica, stage, cause, flight.id)
        replayed = 0
        for other in window:  # oldest first, so the new worker gets them in order
            if other.replica != flight.replica:
                continue
            if self._first_unfinished(other) > stage or self._finished(other):
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
        self._replayed += 1

    def _replace_stage(self, replica: int, stage: int, cause: str, micro_batch: int | None = None) -> None:
        """Kill a stage's workers and start new ones in their bundles, within ``max_restarts``."""
        key = (replica, stage)
        self.restarts[key] = self.restarts.get(key, 0) + 1
        if self.restarts[key] > self.config.max_restarts:
            where = "" if micro_batch is None else f" (micro-batch {micro_batch})"
            raise WorkerError(f"stage {stage} worker (replica {replica}) was lost {self.restarts[key]} times, over "
                              f"max_restarts={self.config.max_restarts}; last cause: {cause}{where}", stage=stage,
                              micro_batch=micro_batch)
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

    def _fail_data(self, flight: Flight, failure: Failure, pending: dict, on_error: str) -> None:
        prefix = f"stage {failure.stage}, micro-batch {flight.id}"
        message = failure.message if failure.message.startswith(prefix) else f"{prefix}: {failure.message}"
        if on_error == "skip":
            if pending.get(flight.request) is not None:
                self.skipped.append(Skipped(flight.request, flight.id, failure.stage, message))
                pending[flight.request] = None  # the batch is left out; its other parts are dropped on arrival
            return
        if failure.kind == "InputError":
            raise InputError(message)
        raise WorkerError(message, stage=failure.stage, micro_batch=flight.id)

    def _ready(self, order: deque, pending: dict) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        while order:
            assembly = pending[order[0]]
            if assembly is None:  # skipped
                pending.pop(order.popleft())
                continue
            if not assembly.done:
                return
            request = order.popleft()
            pending.pop(request)
            yield request, assembly.outputs


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

"""The coordinator: start stage workers on Ray and stream micro-batches through them.

Micro-batch ``i`` goes to replica ``i % R``; on that replica it is a chain of actor calls whose ObjectRefs pass
straight from stage to stage, so activations never come through the coordinator. At most ``max_in_flight``
micro-batches are in the pipeline at once, and results are taken oldest first, so they come back in order and
memory stays flat over an unbounded stream.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from onnxshard.distributed import microbatch
from onnxshard.distributed.stats import RunStats, summarise
from onnxshard.errors import InputError, OnnxShardError, PlanError, WorkerError
from onnxshard.plan import PLAN_FILE, Plan
from onnxshard.runtime import RuntimeConfig, arrow
from onnxshard.runtime.session import check_feeds
from onnxshard.workers import Failure, StageWorker

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PipelineConfig:
    """How a plan runs on Ray.

    micro_batch_size: samples per micro-batch; ``None`` splits each batch into about 4 x stages x replicas.
    replicas: data-parallel copies of the whole pipeline; micro-batches are dealt round robin.
    cpus_per_stage / gpus_per_stage / resources: what each stage worker asks Ray for (one placement-group
        bundle each); ORT's intra-op threads follow the CPUs.
    max_in_flight: micro-batches in the pipeline at once (default 2 x stages x replicas).
    placement_timeout_s: how long to wait for the cluster to grant the workers' resources.
    batch_axes: the batch axis per input/output name, or the symbolic dim name of the batch; inferred if None.
    """

    micro_batch_size: int | None = None
    replicas: int = 1
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_in_flight: int | None = None
    placement_timeout_s: float = 60.0
    placement_strategy: str = "PACK"
    batch_axes: dict[str, int | None] | str | None = None
    runtime: RuntimeConfig = RuntimeConfig()


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
        if self.config.micro_batch_size is not None and self.config.micro_batch_size < 1:
            raise PlanError(f"micro_batch_size must be at least 1 (got {self.config.micro_batch_size})")
        self._tmp: Path | None = None
        self.plan = self._resolve_plan(plan, stages)
        self.axes = microbatch.infer_batch_axes(self.plan, self.config.batch_axes)
        self._owns_ray = False
        self._pg = None
        self.workers: list[list] = []
        self.stats: RunStats | None = None
        self._next_id = 0
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
        if (path / PLAN_FILE).is_file():
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
                     log_to_driver=True, configure_logging=True)
            self._owns_ray = True
        cfg, k = self.config, self.plan.num_stages
        bundle = {"CPU": cfg.cpus_per_stage, **({"GPU": cfg.gpus_per_stage} if cfg.gpus_per_stage else {}),
                  **cfg.resources}
        bundle = {key: v for key, v in bundle.items() if v}
        self._pg = placement_group([dict(bundle) for _ in range(k * cfg.replicas)], strategy=cfg.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=cfg.placement_timeout_s)
        except GetTimeoutError:
            raise PlanError(self._unsatisfiable(bundle, k * cfg.replicas)) from None
        actor = ray.remote(StageWorker)
        for r in range(cfg.replicas):
            row = []
            for s in range(k):
                strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r * k + s)
                row.append(actor.options(
                    num_cpus=cfg.cpus_per_stage, num_gpus=cfg.gpus_per_stage, resources=cfg.resources or None,
                    max_restarts=0, max_task_retries=0, scheduling_strategy=strategy, name=None,
                ).remote(str(self.plan.root), s, cfg.runtime))
            self.workers.append(row)
        try:
            self.worker_info = ray.get([w.ready.remote() for row in self.workers for w in row])
        except RayActorError as e:
            raise WorkerError(f"a stage worker failed to start: {_cause(e)}") from None

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
        for row in self.workers:
            for w in row:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:  # already dead
                    pass
        self.workers = []
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
        return next(iter(self.stream([feeds], micro_batch_size=micro_batch_size, progress=progress)))

    def stream(self, batches: Iterable[dict[str, np.ndarray]], *, micro_batch_size: int | None = None,
               progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Results for each batch of ``batches``, in order, with a bounded number of micro-batches in flight.

        ``micro_batch_size`` overrides the pipeline's for these batches; ``progress(done, submitted)`` is called as
        each micro-batch completes."""
        size = self.config.micro_batch_size if micro_batch_size is None else micro_batch_size
        if size is not None and size < 1:
            raise InputError(f"micro_batch_size must be at least 1 (got {size})")
        if not self.workers:
            raise WorkerError("the pipeline is closed")
        k, replicas = self.plan.num_stages, self.config.replicas
        window_size = self.config.max_in_flight or 2 * k * replicas
        window: deque = deque()  # (request, part, micro-batch id, final ref, stats refs)
        pending: dict[int, list] = {}
        order: deque = deque()
        calls, samples, count, started = [], 0, 0, time.perf_counter()
        try:
            for request, feeds in enumerate(batches):
                chunks = self._prepare(feeds, size)
                samples += microbatch.batch_size(feeds, self.axes)
                pending[request] = [None] * len(chunks)
                order.append(request)
                for part, chunk in enumerate(chunks):
                    while len(window) >= window_size:
                        calls += self._finish(window.popleft(), pending)
                        if progress:
                            progress(len(calls) // k, count)
                        yield from self._ready(order, pending)
                    window.append(self._submit(part, chunk, request))
                    count += 1
            while window:
                calls += self._finish(window.popleft(), pending)
                if progress:
                    progress(len(calls) // k, count)
                yield from self._ready(order, pending)
        finally:
            self.stats = summarise(calls, num_stages=k, replicas=replicas, samples=samples, micro_batches=count,
                                   wall_s=time.perf_counter() - started)

    def _prepare(self, feeds, size: int | None) -> list[dict[str, np.ndarray]]:
        """Check a batch against the model's inputs and split it, before anything is scheduled."""
        if not isinstance(feeds, dict):
            raise InputError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
        check_feeds(feeds, self.plan.inputs, where="model")
        if size is None and self.axes is not None:
            total = microbatch.batch_size(feeds, self.axes)
            size = max(1, -(-total // (4 * self.plan.num_stages * self.config.replicas)))
        return microbatch.split(feeds, self.axes, size)

    def _submit(self, part: int, chunk: dict[str, np.ndarray], request: int):
        mb = self._next_id
        self._next_id += 1
        row = self.workers[mb % self.config.replicas]
        ref = arrow.encode(chunk, {t.name: t.dtype for t in self.plan.inputs})
        stats = []
        for worker in row:
            ref, st = worker.run.options(num_returns=2).remote(ref, mb)
            stats.append(st)
        return request, part, mb, ref, stats

    def _finish(self, item, pending) -> list:
        request, part, mb, ref, stats = item
        try:
            result = ray.get(ref)
            calls = ray.get(stats)
        except (RayActorError, RayTaskError) as e:
            raise WorkerError(f"micro-batch {mb}: a stage worker died: {_cause(e)}", micro_batch=mb) from None
        if isinstance(result, Failure):
            prefix = f"stage {result.stage}, micro-batch {mb}"
            message = result.message if result.message.startswith(prefix) else f"{prefix}: {result.message}"
            if result.kind == "InputError":
                raise InputError(message)
            raise WorkerError(message, stage=result.stage, micro_batch=mb)
        pending[request][part] = arrow.decode(result, [t.name for t in self.plan.outputs])
        return calls

    def _ready(self, order: deque, pending: dict) -> Iterator[dict[str, np.ndarray]]:
        while order and all(p is not None for p in pending[order[0]]):
            parts = pending.pop(order.popleft())
            merged = microbatch.merge(parts, self.axes)
            yield {name: np.array(v) if len(parts) == 1 else v for name, v in merged.items()}


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None) or getattr(e, "error_msg", None) or e
    if isinstance(cause, OnnxShardError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(e).__name__

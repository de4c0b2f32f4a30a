"""How a plan runs on Ray: the pipeline's options in one frozen dataclass, checked before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxshard.errors import PlanError
from onnxshard.runtime import RuntimeConfig


@dataclass(frozen=True)
class PipelineConfig:
    """How a plan runs on Ray.

    micro_batch_size: samples per micro-batch; ``"auto"`` (the default) sizes them from measured stage costs (see
        ``Pipeline.auto_micro_batch_size``; the first batch is split as ``None`` does); ``None`` splits each batch
        into about 4 x stages x replicas.
    call_overhead_s: what one actor call costs beyond its compute, for ``"auto"`` until a run has measured it
        (2 ms: measured on a 2-core machine, benchmarks/RESULTS.md).
    replicas: data-parallel copies of the whole pipeline; micro-batches are dealt round robin. ``None`` (the
        default): the plan's (``plan(workers=W)`` chooses them; 1 otherwise).
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
    transport: how micro-batches travel between stages: ``"direct"`` (sockets between the workers, Arrow IPC
        frames: Unix sockets within a node, TCP between nodes; a tensor-parallel stage's ranks reduce over a mesh
        of their own), ``"ray"`` (actor calls chained
        by ObjectRef; any cluster) or ``"auto"`` (direct where it applies, else ray).
    run_timeout_s: a request (a ``run``, or each batch of a ``stream``) not back this long after it was queued
        fails (its micro-batches finish and are dropped).
    worker_start_timeout_s: how long a (re)started worker may take to load its shard.
    placement_group: ``"own"`` (the default): the pipeline reserves a placement group of its own (a bundle per
        worker) and frees it at close; ``"current"``: its workers take the last bundles of the placement group the
        caller runs in (a Ray Serve replica deployed with ``placement_group_bundles``: optionally a bundle of its
        own, then one per worker; a replica asking for no CPU shares the first worker's bundle).
    name: labels the pipeline's metrics (``model="..."``): a served model's name.
    """

    micro_batch_size: int | str | None = "auto"
    call_overhead_s: float = 0.002
    replicas: int | None = None
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
    placement_group: str = "own"
    name: str = "pipeline"

TRANSPORTS = ("auto", "direct", "ray")



def check_config(cfg: PipelineConfig) -> None:
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

    number("replicas", 1, strict=False, whole=True, none_ok=True)
    number("cpus_per_stage", 0)
    number("gpus_per_stage", 0, strict=False)
    number("max_in_flight", 1, strict=False, none_ok=True, whole=True)
    number("max_restarts", 0, strict=False, whole=True)
    number("max_retries", 0, strict=False, whole=True)
    for name in ("placement_timeout_s", "connect_timeout_s", "worker_start_timeout_s"):
        number(name, 0)
    for name in ("call_timeout_s", "run_timeout_s", "max_batch_bytes"):
        number(name, 0, none_ok=True)
    check_size_option(cfg.micro_batch_size, PlanError)
    if cfg.transport not in TRANSPORTS:
        raise PlanError(f"transport must be one of {TRANSPORTS} (got {cfg.transport!r})")
    if cfg.placement_group not in ("own", "current"):
        raise PlanError(f"placement_group must be 'own' or 'current' (got {cfg.placement_group!r})")
    if cfg.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise PlanError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD "
                        f"(got {cfg.placement_strategy!r})")


def check_size_option(size, error: type[Exception]) -> None:
    if size is None or size == "auto":
        return
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise error(f"micro_batch_size must be a positive integer or 'auto' (got {size!r})")

"""The StageWorker actor: one stage's ONNX Runtime session, fed Arrow micro-batches, returning Arrow.

A failure is a value: a micro-batch that fails comes back as a :class:`Failure` that later stages pass on
untouched, so the coordinator learns which stage and micro-batch failed and why, and nothing waits forever.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time

import numpy as np
import ray

from onnxshard import dtypes, plan_store
from onnxshard.errors import OnnxShardError, WorkerError
from onnxshard.plans import Plan
from onnxshard.runtime import RuntimeConfig, ShardSession, arrow
from onnxshard.runtime.kv_cache import KvCache, mask_and_positions
from onnxshard.runtime.rank_shard import RankShard
from onnxshard.sampling import SamplingParams, choose
from onnxshard.workers.link import Link
from onnxshard.workers.packets import (  # noqa: F401 - re-exported: where the actor's callers look for them
    CallStats,
    Failure,
    Packet,
    merged_calls,
    packet_from_frame,
    packet_to_frame,
)
from onnxshard.workers.rank_mesh import RankSteps


class StageWorker(RankSteps):
    """Holds one stage's session. Made with ``ray.remote(StageWorker).options(...).remote(...)`` by the
    coordinator; a plain instance works too, for tests and in-process runs."""

    def __init__(self, plan_dir: str, stage_index: int, config: RuntimeConfig | None = None, rank: int = 0):
        # checks the stage files' hashes before ORT sees them; a plan on object storage is copied to this node first
        plan = plan_store.load_stage(plan_dir, stage_index) if plan_store.is_uri(plan_dir) else Plan.load(plan_dir)
        self.stage = plan.stages[stage_index]
        self._kv_pairs = plan.kv_cache
        self._kv_names = {n for p in plan.kv_cache for n in (p.past, p.present)}  # never sent on when generating
        self._last_stage = stage_index == plan.num_stages - 1
        self.cache: KvCache | None = None
        self.index, self.rank = stage_index, rank
        config = config or RuntimeConfig()
        threads, device_id, provider = _assigned(config)
        self.config = dataclasses.replace(config, intra_op_threads=threads, provider=provider, device_id=device_id)
        if self.stage.steps:
            self.shard = RankShard(plan, self.stage, rank, self.config)
            sessions = list(self.shard.sessions.values())
            self._step_types = [{t.name: t.dtype for t in step.outputs + step.inputs} for step in self.stage.steps]
            self._last_step = self.shard.steps()[-1]  # where this rank finishes a micro-batch
        else:
            self.session = ShardSession(plan.stage_path(self.stage), self.stage.inputs, self.stage.outputs,
                                        self.config, plan.weights_dir(), label=f"stage {stage_index}")
            sessions = [self.session]
            self._last_step = 0
        self.providers = sessions[0].providers if sessions else []
        self._types = {t.name: t.dtype for t in self.stage.outputs}
        self._metrics = _StageMetrics(stage_index) if ray.is_initialized() else None
        self._link: Link | None = None
        self._mesh = None  # a tensor-parallel rank's sockets to the other ranks (direct transport)
        self._hold_over: int | None = None
        self._held: collections.OrderedDict = collections.OrderedDict()
        self._held_lock = threading.Lock()
        self._keep = 0
        self.warm_s = self._warm() if not self.stage.steps else None

    def _warm(self) -> float | None:
        """Run the shard once on a one-sample input of zeros (symbolic dims as 1), so ONNX Runtime's slow first
        run (allocations, kernel choice) is paid at start-up and not by the first request; its time seeds the
        coordinator's call deadline. A model that refuses such an input just starts cold (``None``)."""
        feeds = {}
        for t in self.stage.inputs:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in (t.shape or ())]
            feeds[t.name] = np.zeros(shape, dtype=object if t.dtype == "string" else dtypes.numpy_dtype(t.dtype))
            if t.dtype == "string":
                feeds[t.name][...] = ""
        t0 = time.perf_counter()
        try:
            self.session.run(feeds)
        except Exception:  # noqa: BLE001 - zeros are not valid for every model (ids, shapes): start cold
            return None
        return time.perf_counter() - t0

    def ready(self) -> dict:
        """Where and how this worker runs (the coordinator waits on it after starting the actor)."""
        return {"stage": self.index, "rank": self.rank, "pid": os.getpid(), "providers": self.providers,
                "threads": self.config.intra_op_threads, "node": _node_id(), "warm_s": self.warm_s}

    def run(self, packet: Packet, micro_batch: int) -> Packet:
        """Run one micro-batch. A packet is ``(batch or Failure, stats of the calls so far)``: one object per hop,
        so the coordinator reads every stage's stats from the last result. The batch sent on holds this stage's
        outputs and its carried columns."""
        batch, calls = packet

        def work():
            feeds = arrow.decode(batch, self.stage.input_names)
            outputs = self.session.run(feeds, micro_batch=micro_batch, stage=self.index)
            columns = [arrow.tensor_to_column(n, v, self._types.get(n)) for n, v in outputs.items()]
            return arrow.assemble(columns + arrow.select(batch, list(self.stage.carry))), 0.0

        return self._call(micro_batch, calls, [batch], work)

    def run_step(self, step: int, micro_batch: int, *packets: Packet) -> Packet:
        """One step of a tensor-parallel stage on this rank. ``packets`` are the stage input (step 0) or every
        rank's packet from the step before, in rank order: this rank reads its own and takes from all of them
        the values it makes whole (sum or concatenation) before running its session for the step."""
        calls = merged_calls(packets)
        # Between steps the batches travel as refs this worker put in the object store (see below): fetch them.
        refs = [b for b, _ in packets if isinstance(b, ray.ObjectRef)]
        fetched = dict(zip(refs, ray.get(refs))) if refs else {}
        batches = [fetched.get(b, b) if isinstance(b, ray.ObjectRef) else b for b, _ in packets]
        result, calls = self._call(micro_batch, calls, batches, lambda: self._step(step, micro_batch, batches),
                                   step=step)
        if not isinstance(result, Failure) and step < len(self.stage.steps) - 1 and ray.is_initialized():
            # Every rank reads this batch: put it in the shared-memory store and send the ref, so it goes from
            # worker to worker even when Ray would return it inline through the coordinator.
            result = ray.put(result)
        return result, calls

    def _step(self, step: int, micro_batch: int, batches: list, received: bool = False) -> tuple:
        """Step ``step`` of this rank: its own values from its batch in ``batches`` (every rank's, in rank order,
        or the stage input alone), the values to make whole from all of them (``received``: the other ranks'
        batches are frames read off sockets, buffers of their own, which a sum may write into). Returns (the batch
        it makes, the seconds spent decoding and reducing)."""
        own_names, source_names = self.shard.wants(step)
        own_batch = batches[self.rank if len(batches) > 1 else 0]
        own = arrow.decode(own_batch, own_names)
        r0 = time.perf_counter()
        sources = [arrow.decode(b, source_names, writable=received and b is not own_batch) for b in batches] \
            if source_names else []
        decode_s = time.perf_counter() - r0
        made, carried, reduce_s = self.shard.run(step, own, sources, micro_batch=micro_batch, scratch=received)
        types = self._step_types[step]
        columns = [arrow.tensor_to_column(n, v, types.get(n, self._types.get(n))) for n, v in made.items()]
        present = set(own_batch.schema.names)
        columns += arrow.select(own_batch, [c for c in carried if c in present])
        columns += [arrow.tensor_to_column(c, v, types.get(c, self._types.get(c))) for c, v in carried.items()
                    if c not in present]
        return arrow.assemble(columns), decode_s + reduce_s

    # -- generation (see distributed/generator.py) -------------------------------------------------------------
    def open_cache(self, capacity_bytes: int | None = None) -> int:
        """Start keeping this stage's layers' KV cache (empty), capped at ``capacity_bytes``; returns the bytes one
        cached token takes here."""
        if self.stage.steps:
            raise WorkerError("generation runs on stages without tensor parallelism", stage=self.index)
        inputs = set(self.stage.input_names)
        self.cache = KvCache(tuple(p for p in self._kv_pairs if p.past in inputs), {t.name: t for t in self.stage.inputs},
                             capacity_bytes)
        return self.cache.token_bytes

    def generate_step(self, batch, step: dict):
        """One generation step: ``step`` names its rows (``seqs``), the tokens each has cached (``lengths``), the
        tokens each feeds (``new``) and, per row, the sampling parameters and the uniform number drawn for its
        next token (``sample``). The received batch plus this stage's cache in, the batch for the next stage out:
        the presents stay here, the attention mask and positions are made here from the lengths, the pasts of
        later stages and presents of earlier ones are not carried. The last stage sends only each row's next
        token (``next_token``), sampled from the logits made here or carried here."""
        seqs, lengths = step["seqs"], step["lengths"]
        kv_names = self._kv_names
        local = mask_and_positions(lengths, step["new"])
        feeds = arrow.decode(batch, [n for n in self.stage.input_names if n not in kv_names and n not in local])
        feeds.update({n: local[n] for n in self.stage.input_names if n in local})
        feeds.update(self.cache.feeds(seqs, lengths))
        outputs = self.session.run(feeds, stage=self.index)
        self.cache.keep(seqs, lengths, outputs)
        if self._last_stage:
            logits = (outputs["logits"] if "logits" in outputs else arrow.decode(batch, ["logits"])["logits"])[:, -1]
            tokens = [choose(row, SamplingParams.from_json(p), u) for row, (p, u) in zip(logits, step["sample"])]
            return arrow.assemble([arrow.tensor_to_column("next_token", np.array(tokens, np.int64))])
        columns = [arrow.tensor_to_column(n, v, self._types.get(n)) for n, v in outputs.items() if n not in kv_names]
        carry = [c for c in self.stage.carry if c not in kv_names and c not in local]
        return arrow.assemble(columns + arrow.select(batch, carry))

    def _serve_generation(self, step_id: int, batch, meta: dict):
        """A generation step over the direct links; an error goes on down the chain as a failure. A ``free``
        frame drops sequences' caches (in order with the steps before it) and goes on."""
        if "free" in meta:
            self.cache.free(meta["free"])
            return None, meta
        if "failure" in meta:
            return None, meta
        try:
            return self.generate_step(batch, meta["gen"]), {"gen": meta["gen"]}
        except Exception as e:  # noqa: BLE001 - reported to the coordinator, which decides
            kind = type(e).__name__ if isinstance(e, OnnxShardError) else "WorkerError"
            failure = Failure(self.index, step_id, f"stage {self.index}: {e}", kind)
            return None, {"gen": meta["gen"], "failure": dataclasses.asdict(failure)}

    def free_cache(self, seqs: list[str]) -> int:
        """Drop these sequences' caches; returns the bytes still held."""
        self.cache.free(seqs)
        return self.cache.used_bytes

    # -- direct transport (see workers/link.py) --------------------------------------------------------------
    def open_link(self, folder: str | None = None, tcp: bool = False, token: bytes = b"") -> str:
        """Close any link this worker serves and listen for a new one: a Unix socket inside ``folder`` (the
        coordinator's, which it removes at close even if this worker was killed; ``None`` on another node), or
        with ``tcp`` (the stage before runs on another node) TCP on this node's address. Only a peer that sends
        ``token`` is let in. Returns the address to send to."""
        if self._link is not None:
            self._link.close()
        host = ray.util.get_node_ip_address() if tcp else None
        self._link = Link(self._serve_frame, folder, host, token)
        return self._link.path

    def link_kinds(self) -> dict[str, str]:
        """How this worker's link reaches the stage before (``up``) and after (``down``): ``unix`` or ``tcp``."""
        return {} if self._link is None else dict(self._link.kinds)

    def start_link(self, downstream: str, hold_over: int | None = None, keep: int = 0) -> None:
        """Serve the link opened last: results go to the socket at ``downstream``. ``hold_over`` (the last stage):
        a result of that many bytes or more stays here and only a note goes down the link; the coordinator takes
        it with :meth:`fetch`, through Ray's shared-memory object store (one copy instead of two through the
        socket). At most ``keep`` results are held; older ones are dropped (their micro-batches get resent)."""
        self._hold_over, self._keep = hold_over, keep
        with self._held_lock:
            self._held.clear()
        self._link.start(downstream)

    def fetch(self, micro_batch: int):
        """A result held back from the link (see start_link)."""
        with self._held_lock:
            batch = self._held.pop(micro_batch, None)
        if batch is None:
            raise WorkerError(f"stage {self.index} holds no result for micro-batch {micro_batch} (dropped: more "
                              f"than {self._keep} were waiting)", stage=self.index, micro_batch=micro_batch)
        return batch

    def busy_seconds(self) -> float:
        """How long the link has been computing its current micro-batch (0 when idle): the coordinator's hang
        check. Answered on the actor's own thread, so a stopped or wedged process does not answer at all. A rank of a
        tensor-parallel stage other than 0 counts the micro-batch it runs with the others."""
        return max(0.0 if self._link is None else self._link.busy_seconds(), self.mesh_busy_seconds())

    def _serve_frame(self, micro_batch: int, batch, meta: dict):
        if "gen" in meta or "free" in meta:
            return self._serve_generation(micro_batch, batch, meta)
        packet = packet_from_frame(batch, meta)
        if self.stage.steps:
            out, meta = packet_to_frame(self.run_ranks(self.check_mesh(), micro_batch, packet))
        else:
            out, meta = packet_to_frame(self.run(packet, micro_batch))
        if self._hold_over is None or out is None or out.nbytes < self._hold_over:
            return out, meta
        with self._held_lock:
            self._held[micro_batch] = out
            while len(self._held) > max(1, self._keep):
                self._held.popitem(last=False)
        return None, {**meta, "held": True}

    def _call(self, micro_batch: int, calls: tuple, batches: list, work, *, step: int = 0) -> Packet:
        """``work()`` -> (batch, seconds spent reducing) for one micro-batch, its errors turned into a
        :class:`Failure` value and its cost recorded; a Failure among ``batches`` is handed on untouched."""
        started = time.time()
        failure = next((b for b in batches if isinstance(b, Failure)), None)
        if failure is not None:
            return failure, (*calls, CallStats(self.index, micro_batch, started, 0.0, 0, failed=True,
                                               rank=self.rank, step=step))
        t0, reduce_s = time.perf_counter(), 0.0
        try:
            result, reduce_s = work()
        except OnnxShardError as e:
            result = Failure(self.index, micro_batch, str(e), type(e).__name__)
        except MemoryError as e:  # numpy or Arrow could not allocate: the worker's memory, not the data
            result = Failure(self.index, micro_batch, f"stage {self.index}: out of memory ({e})", "ResourceError")
        except Exception as e:  # an unexpected bug still reaches the caller as a value, with its type
            where = f"stage {self.index}" + (f" rank {self.rank} step {step}" if self.stage.steps else "")
            result = Failure(self.index, micro_batch, f"{where}: {type(e).__name__}: {e}")
        failed = isinstance(result, Failure)
        stats = CallStats(self.index, micro_batch, started, time.perf_counter() - t0, 0 if failed else result.nbytes,
                          failed=failed, rank=self.rank, step=step, reduce_s=reduce_s)
        return result, (*calls, self._record(stats))

    def _record(self, stats: CallStats) -> CallStats:
        if self._metrics is not None:
            # a tensor-parallel rank counts a micro-batch once, at its last step
            self._metrics.record(stats, finished=stats.step == self._last_step)
        return stats


class _StageMetrics:
    """Per-stage counters exported through Ray's metrics API (Prometheus, via each node's metrics agent)."""

    def __init__(self, stage: int):
        from ray.util.metrics import Counter

        tags = {"stage": str(stage)}
        self.micro_batches = Counter("onnxshard_stage_micro_batches", "micro-batches a stage worker ran",
                                     tag_keys=("stage",))
        self.busy = Counter("onnxshard_stage_busy_seconds", "seconds a stage worker spent in ONNX Runtime",
                            tag_keys=("stage",))
        self.sent = Counter("onnxshard_stage_sent_bytes", "bytes a stage worker sent on", tag_keys=("stage",))
        self.failures = Counter("onnxshard_stage_failures", "micro-batches that failed in a stage",
                                tag_keys=("stage",))
        for metric in (self.micro_batches, self.busy, self.sent, self.failures):
            metric.set_default_tags(tags)

    def record(self, stats: CallStats, finished: bool = True) -> None:
        if finished:
            self.micro_batches.inc()
        if stats.compute_s > 0:  # Ray counters refuse increments of 0
            self.busy.inc(stats.compute_s)
        if stats.sent_bytes:
            self.sent.inc(stats.sent_bytes)
        if stats.failed:
            self.failures.inc()


def _assigned(config: RuntimeConfig) -> tuple[int, int, str]:
    """Threads from the CPUs Ray gave this actor; CUDA device from its GPU, if it has one."""
    threads, device_id, provider = config.intra_op_threads, config.device_id, config.provider
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return threads, device_id, provider  # a plain instance (tests, in-process runs), even beside a Ray driver
    ctx = ray.get_runtime_context()
    cpus = ctx.get_assigned_resources().get("CPU", 0)
    if not threads:
        threads = max(1, int(round(cpus))) if cpus else 1
    if config.turns:  # no more threads than the cores this process may run on (cpu_count may say None)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or threads
        threads = min(threads, cores)
    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and provider in ("auto", "cuda"):
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so inside the actor the first one is device 0.
        device_id, provider = 0, "cuda"
    elif provider == "auto":
        provider = "cpu"
    return threads, device_id, provider


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

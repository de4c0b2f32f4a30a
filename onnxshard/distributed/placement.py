"""Where the stage workers run: one placement group for the whole pipeline (a bundle per worker), the workers
started in their bundles, waited for, replaced in the same bundle when lost, and freed. Ray's placement groups
never fail on their own (they wait), so a request the cluster can never grant is refused at once and a slow grant
is bounded by ``placement_timeout_s``."""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections import deque
from dataclasses import replace

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import (
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from onnxshard.distributed import cluster, groups
from onnxshard.distributed.config import PipelineConfig
from onnxshard.distributed.decoding import turn_threads
from onnxshard.errors import ClusterError, OnnxShardError, PlanError, WorkerError
from onnxshard.plans import Plan
from onnxshard.workers import StageWorker

log = logging.getLogger(__name__)
RETIRED = 100  # replaced workers remembered (killed again at close)


@functools.cache
def _stage_worker():
    """StageWorker as a Ray actor class, made once per process: Ray exports a class it has not seen to the cluster,
    disassembling every method to name it (0.2 s of the driver's time for each worker started when the class was
    made anew for each)."""
    return ray.remote(StageWorker)


class _NeverStarted(WorkerError):
    """A new worker never ran (its node died first): not an error of the worker's own."""


class Placement:
    """The workers of every replica: ``workers[replica][stage][rank]`` (actor handles) and ``info`` (what each
    said when ready: node, pid, threads, warm-up seconds).

    turns: the stages may take turns (a generator, one step in flight at a time): when every worker's bundle is on
    one node's CPUs, ``turn_threads`` is what each session runs (``decoding.turn_threads``), else ``None``."""

    def __init__(self, plan: Plan, config: PipelineConfig, *, owns_ray: bool, turns: bool = False):
        self.plan, self.config = plan, config
        count = plan.num_workers * config.replicas
        self.bundle = worker_bundle(config)
        self.retired: deque = deque(maxlen=RETIRED)
        self.workers: list[list[list]] = []
        self.info: list[list[list[dict]]] = []
        self.owns_group = config.placement_group == "own"
        self.first_bundle = 0
        self.moved: dict[tuple[int, int], object] = {}  # (replica, stage) -> its own group, after its node crashed
        if self.owns_group:
            self.group = self._reserve(count, owns_ray)
        else:
            self.group = self._current(count)
        self.turn_threads = None
        try:
            if turns:
                nodes = cluster.bundle_nodes(self.group)[self.first_bundle:self.first_bundle + count]
                self.turn_threads = turn_threads(nodes, config.cpus_per_stage, config.gpus_per_stage,
                                                 max(s.tensor_parallel for s in plan.stages))
            for r in range(config.replicas):
                self.workers.append([])
                for s in range(plan.num_stages):
                    self.workers[r].append(self.spawn(r, s))
            self.info = [[self.await_ready(ranks) for ranks in row] for row in self.workers]
        except BaseException:  # a worker that cannot load its shard: free what was started, group included
            self.close()
            raise

    def _reserve(self, count: int, owns_ray: bool):
        config = self.config
        never = cluster.infeasible([self.bundle] * count, cluster.node_totals(), config.placement_strategy)
        if never and (owns_ray or not cluster.autoscales()):  # waiting cannot help: say so now
            raise ClusterError(f"the cluster can never place {count} stage workers of {self.bundle} ({never}); add "
                               "nodes, lower cpus_per_stage/gpus_per_stage/replicas, or use fewer stages")
        group = _new_group([dict(self.bundle) for _ in range(count)], config.placement_strategy)
        try:
            ray.get(group.ready(), timeout=config.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise ClusterError(self._unsatisfiable(count)) from None
        return group

    def _current(self, count: int):
        """The caller's placement group, checked to end in a bundle like ours for each worker (the workers take
        the last ``count`` bundles; one before them may hold the caller)."""
        group = get_current_placement_group()
        if group is None:
            raise ClusterError("placement_group='current' needs a caller inside a placement group (a Ray Serve "
                               "replica deployed with placement_group_bundles); use placement_group='own'")
        specs = group.bundle_specs
        self.first_bundle = len(specs) - count
        fits = self.first_bundle >= 0 and all(all(b.get(k, 0) >= v for k, v in self.bundle.items())
                                              for b in specs[self.first_bundle:])
        if not fits:
            raise ClusterError(f"the caller's placement group has {len(specs)} bundles ({specs[:3]}...); the "
                               f"pipeline needs its last {count} to hold {self.bundle} each")
        return group

    def spawn(self, replica: int, stage: int) -> list:
        """Start a stage's workers (one per tensor-parallel rank), each in its own placement-group bundle."""
        cfg = self.config
        first = self.first_bundle + replica * self.plan.num_workers + sum(s.tensor_parallel for s in self.plan.stages[:stage])
        group = self.moved.get((replica, stage))
        group, first = (self.group, first) if group is None else (group, 0)
        runtime = cfg.runtime
        if self.turn_threads is not None and group is self.group:  # a moved stage is on a node of its own
            runtime = replace(runtime, intra_op_threads=runtime.intra_op_threads or self.turn_threads, turns=True)
        return [_stage_worker().options(
            num_cpus=cfg.cpus_per_stage, num_gpus=cfg.gpus_per_stage, resources=cfg.resources or None,
            max_restarts=0, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first + rank),
        ).remote(self.plan.location, stage, runtime, rank) for rank in range(self.plan.stages[stage].tensor_parallel)]

    def await_ready(self, workers: list, timeout: float | None = None) -> list[dict]:
        timeout = self.config.worker_start_timeout_s if timeout is None else timeout
        try:
            return ray.get([w.ready.remote() for w in workers], timeout=max(0.0, timeout))
        except RayActorError as e:
            if not e.actor_init_failed:  # not the worker's own error: its node died, or it was never scheduled
                raise _NeverStarted(f"a stage worker never started: {cause_of(e)}") from None
            raise WorkerError(f"a stage worker failed to start: {cause_of(e)}") from None
        except GetTimeoutError:
            raise WorkerError(f"stage workers did not load their shards within {timeout:g} s; raise "
                              "worker_start_timeout_s for large shards") from None

    def replace(self, replica: int, stage: int) -> list[dict]:
        """Kill a stage's workers (all its ranks: they run each micro-batch together) and start new ones in their
        bundles; returns what the new ones said when ready. When the bundle's node has died, Ray moves the bundle
        to a node with room, and the workers started before that never run: wait for the move and start them
        again. A node that crashed, which Ray gives up only after its health check, is not waited for: the stage
        gets a placement group of its own on the nodes left. All within ``worker_start_timeout_s``."""
        old = self.workers[replica][stage]
        nodes = {w["node"] for w in self.info[replica][stage]}
        self.retired.extend(old)
        kill(old)
        end = time.monotonic() + self.config.worker_start_timeout_s
        crashed = [n for n in nodes if cluster.node_state(n) == "unreachable"]
        if crashed:
            self._move(replica, stage, crashed[0], end)
        while True:
            new = self.spawn(replica, stage)
            self.workers[replica][stage] = new
            try:
                self.info[replica][stage] = self.await_ready(new, end - time.monotonic())
                return self.info[replica][stage]
            except _NeverStarted as e:
                if time.monotonic() >= end:
                    raise
                log.warning("stage %d's new worker never started (%s): starting it again once its placement-group "
                            "bundle is placed", stage, str(e).splitlines()[-1])
            self.retired.extend(new)
            kill(new)
            try:
                ray.get(self.moved.get((replica, stage), self.group).ready(), timeout=max(0.0, end - time.monotonic()))
            except GetTimeoutError:
                raise WorkerError(f"stage {stage}'s workers lost their node {', '.join(sorted(map(str, nodes)))}, "
                                  f"and the cluster had no room for "
                                  f"{self.bundle} elsewhere within worker_start_timeout_s="
                                  f"{self.config.worker_start_timeout_s:g}") from None

    def _move(self, replica: int, stage: int, node: str, end: float) -> None:
        """Give a stage whose node crashed a placement group of its own (its bundle in the pipeline's group stays
        reserved: Ray moves it once it gives the node up, if there is room, and it is freed at close)."""
        count = self.plan.stages[stage].tensor_parallel
        log.warning("stage %d's node %s does not answer: placing its workers on the nodes left", stage, node)
        group = _new_group([dict(self.bundle) for _ in range(count)], "PACK")
        try:
            ray.get(group.ready(), timeout=max(0.0, end - time.monotonic()))
        except GetTimeoutError:
            remove_placement_group(group)
            raise WorkerError(f"stage {stage}'s node {node} is gone, and the nodes left had no room for {count} x "
                              f"{self.bundle} within worker_start_timeout_s={self.config.worker_start_timeout_s:g}; "
                              "add a node or free resources") from None
        earlier = self.moved.pop((replica, stage), None)
        if earlier is not None:
            remove_placement_group(earlier)
        self.moved[(replica, stage)] = group

    def nodes(self, replica: int) -> list[list[str]]:
        """The node of each worker of ``replica``: per stage, per tensor-parallel rank."""
        return [[w["node"] for w in ranks] for ranks in self.info[replica]]

    def warm_seconds(self) -> list[float]:
        """Each worker's warm-up run (one sample), where it ran."""
        return [w["warm_s"] for row in self.info for ranks in row for w in ranks if w.get("warm_s") is not None]

    def transport(self, wanted: str) -> str:
        """``direct`` where it applies (see PipelineConfig.transport), else ``ray``."""
        if wanted == "ray":
            return "ray"
        why = None
        if not hasattr(socket, "AF_UNIX"):
            why = "this platform has no Unix sockets"
        if why is None:
            return "direct"
        if wanted == "direct":
            raise PlanError(f"transport 'direct' cannot be used here: {why}; use transport='ray' or 'auto'")
        return "ray"

    def close(self) -> None:
        """Kill every worker, replaced ones included, and free the placement group (and those of moved stages)."""
        kill([w for row in self.workers for ranks in row for w in ranks] + list(self.retired))
        self.workers = []
        self.retired.clear()
        # the pipeline's own group; the caller's (a Serve replica's) is Serve's to free
        for group in list(self.moved.values()) + ([self.group] if self.owns_group else []):
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - already gone with the cluster
                pass
        self.moved.clear()

    def _unsatisfiable(self, count: int) -> str:
        total = ray.cluster_resources()
        free = ray.available_resources()
        need = {key: v * count for key, v in self.bundle.items()}
        short = "; ".join(f"{key}: need {v:g}, cluster has {total.get(key, 0):g} ({free.get(key, 0):g} free)"
                          for key, v in need.items() if total.get(key, 0) < v or free.get(key, 0) < v)
        return (f"the cluster cannot place {count} stage workers of {self.bundle} within "
                f"{self.config.placement_timeout_s:g} s ({short or 'resources are busy'}); add nodes, lower "
                "cpus_per_stage/gpus_per_stage/replicas, or use fewer stages")


def _new_group(bundles: list[dict[str, float]], strategy: str):
    """A placement group named for its owner, reserved after freeing those whose owner is gone."""
    groups.free_abandoned()
    return placement_group(bundles, strategy=strategy, name=groups.new_name())


def worker_bundle(config: PipelineConfig) -> dict[str, float]:
    """What one stage worker reserves: a placement-group bundle."""
    bundle = {"CPU": config.cpus_per_stage, **({"GPU": config.gpus_per_stage} if config.gpus_per_stage else {}),
              **config.resources}
    return {key: v for key, v in bundle.items() if v}


def kill(workers) -> None:
    for worker in workers:
        try:
            ray.kill(worker, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass


def cause_of(e: Exception) -> str:
    """The line of a Ray error that says what went wrong."""
    cause = getattr(e, "cause", None) or getattr(e, "error_msg", None) or e
    if isinstance(cause, OnnxShardError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(e).__name__

"""The coordinator's wait for a micro-batch's result, and the one recovery both transports share: a lost, hung or
out-of-memory worker is replaced within the restart budget, and each micro-batch it took with it is sent again
within ``max_retries``; one out of retries fails its own batch, and the pipeline goes on."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from onnxshard.distributed.config import PipelineConfig
from onnxshard.distributed.flights import Flight, Recovery
from onnxshard.distributed.limits import RestartBudget, call_deadline
from onnxshard.distributed.links import Woken
from onnxshard.distributed.placement import Placement
from onnxshard.distributed.stats import CostMeter
from onnxshard.distributed.transports import Lost, Transport
from onnxshard.errors import WorkerError
from onnxshard.workers import Failure

log = logging.getLogger(__name__)
HISTORY = 100  # recoveries remembered


class Recoverer:
    """Waits for results through ``transport`` and mends ``placement``'s workers on the way. ``fail(group,
    error)`` fails a batch's requests (once per batch); ``closing`` says whether the pipeline is closing (nothing
    is replaced then)."""

    def __init__(self, config: PipelineConfig, placement: Placement, transport: Transport, cost: CostMeter,
                 fail: Callable, closing: Callable[[], bool]):
        self.config, self.placement, self._transport, self.cost = config, placement, transport, cost
        self._fail, self._closing = fail, closing
        self._budget = RestartBudget(config.max_restarts, config.restart_window_s)
        self.restarts: dict[tuple[int, int], int] = {}  # every restart of each worker, for the record
        self.recoveries: deque[Recovery] = deque(maxlen=HISTORY)  # a pipeline may serve for weeks
        self.slowest_s: float | None = None  # the slowest stage call so far (warm-up included): call deadlines
        self.note_warm_up()

    def note_warm_up(self) -> None:
        """The workers' warm-up runs are a first measurement for the call deadline (one sample, cold: slow)."""
        warm = self.placement.warm_seconds()
        if warm:
            self.note_call(max(warm))

    def note_call(self, seconds: float) -> None:
        self.slowest_s = max(self.slowest_s or 0.0, seconds)

    def wait(self, flight: Flight, window: deque[Flight]) -> tuple | None:
        """The packet of ``flight``, recovering lost, hung and out-of-memory workers on the way; ``None`` when
        the transport was woken to send a new request first."""
        while True:
            try:
                result = self._transport.take(flight, self._wait_budget(flight))
            except Woken:
                return None
            except TimeoutError:
                self._on_timeout(flight, window)
                continue
            except Lost as e:
                self.recover(e.replica, e.stages, e.cause, window, micro_batch=flight.id)
                continue
            failure = result[0]
            if not (isinstance(failure, Failure) and failure.kind == "ResourceError"):
                return result
            # out of memory, a device error: not the data's fault; a fresh worker runs it again
            self.recover(flight.replica, [failure.stage], failure.message, window, force=flight,
                         micro_batch=flight.id)

    def _call_deadline(self, flight: Flight) -> float:
        """How long a stage call of ``flight`` may run (see ``limits.call_deadline``)."""
        return call_deadline(self.config.call_timeout_s, self.slowest_s, self.cost.slot_seconds(flight.samples))

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
            timeout = min(r.timeout_s for r in group.requests if r.timeout_s is not None)
            group.deadline = None
            self._fail(group, WorkerError(
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
            self.recover(flight.replica, hung, f"hung for over {limit:g} s (call deadline)", window)

    def recover(self, replica: int, stages: list[int], cause: str, window: deque[Flight], *,
                force: Flight | None = None, micro_batch: int | None = None) -> None:
        """Replace the ``stages`` of ``replica`` (within the restart budget), make the replica whole again, and
        send again each of its in-flight micro-batches that the lost workers took with them (each within
        ``max_retries``; ``force``: also this one, whose result came back as a resource failure)."""
        t0 = time.perf_counter()
        for stage in stages:
            self._replace_stage(replica, stage, cause, micro_batch)
        self._transport.relink(replica)
        first = min(stages) if stages else None  # None: the chain broke with every worker alive
        replayed, spent, waited = 0, None, window[0] if window else None  # the coordinator waits for the oldest
        failed = []  # batches out of retries: their callers hear once the recovery is on record
        for flight in self._transport.lost(replica, first, window, force):  # oldest first: the new worker gets
            try:                                                            # them in order
                self._count_replay(flight, cause, first)
            except WorkerError as e:  # out of retries (its batch fails) or failed already; the others are sent again
                if flight is waited:
                    spent = e  # raised below: the coordinator takes it out of the window
                else:
                    window.remove(flight)
                    failed.append((flight.group, e))
                continue
            if not self._transport.resend(flight, first):
                break  # the replica broke again: the next wait finds out and recovers again
            replayed += 1
        self.recoveries.append(Recovery(-1 if first is None else first, replica, cause, time.perf_counter() - t0,
                                        replayed))
        for group, error in failed:
            self._fail(group, error)
        if spent is not None:
            raise spent

    def _count_replay(self, flight: Flight, cause: str, stage: int | None) -> None:
        """One more replay of ``flight``, within ``max_retries``; none for a batch that failed already (its callers
        have their error: a deadline, a data failure)."""
        if flight.group.failed:
            raise WorkerError(f"micro-batch {flight.id} was lost after its batch had failed", stage=stage,
                              micro_batch=flight.id)
        flight.replays += 1
        if flight.replays > self.config.max_retries:
            raise WorkerError(f"micro-batch {flight.id} was replayed {flight.replays - 1} times, over "
                              f"max_retries={self.config.max_retries}; last cause: {cause}",
                              stage=stage, micro_batch=flight.id)
        for meter in flight.group.meters:
            meter.replayed += 1

    def _replace_stage(self, replica: int, stage: int, cause: str, micro_batch: int | None = None) -> None:
        """Kill a stage's workers and start new ones in their bundles, within ``max_restarts``."""
        if self._closing():
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
        self.note_warm_up()

"""How micro-batches travel between stages, behind one interface: send one, take its result, find hung or lost
stages, pick the micro-batches a lost worker took with it, and send those again. The coordinator keeps the one
recovery (replace the worker within the restart budget, count each replay within ``max_retries``, resend) and the
one hang check (the call deadline) for both.

- :class:`RayCalls`: per micro-batch a chain of actor calls whose ObjectRefs pass straight from stage to stage, so
  activations never come through the coordinator. Works across nodes and for tensor-parallel stages. A replay
  reissues only the calls from the lost stage on: the stage input made by a live worker still exists.
- :class:`Links`: each replica's workers linked into a chain of sockets (Unix within a node, TCP between
  nodes), coordinator -> stage 0 -> ... -> coordinator, carrying Arrow IPC frames (``links.py``); a hop costs a
  socket copy instead of an actor call. A tensor-parallel stage's rank 0 is its hop; its ranks reduce over a mesh
  of sockets of their own (``workers/rank_mesh.py``), so a lost rank breaks the chain too. A lost worker breaks
  its replica's chain: after the replacement the replica is linked again and every micro-batch of it that has not
  come back is sent again from the start.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from onnxshard.distributed.flights import Flight
from onnxshard.distributed.links import DirectLinks, LinkBroken
from onnxshard.distributed.placement import Placement, cause_of
from onnxshard.errors import WorkerError
from onnxshard.plans import Plan

CALL_ERRORS = (RayActorError, RayTaskError, ObjectLostError)

PROBE_S = 4.0  # how long a worker may take to say how busy it is before it counts as stopped


class Lost(Exception):
    """A worker of ``replica`` is gone: ``stages`` (empty: the chain broke with every worker alive) and why."""

    def __init__(self, replica: int, stages: list[int], cause: str):
        super().__init__(cause)
        self.replica, self.stages, self.cause = replica, stages, cause


class Transport:
    """The interface both transports implement (see the module docstring)."""

    name = ""

    def send(self, flight: Flight) -> None:
        """Start ``flight`` through its replica's stages."""
        raise NotImplementedError

    def take(self, flight: Flight, timeout: float) -> tuple:
        """Its packet (batch or Failure, call stats); :class:`Lost` if a worker on its way died,
        ``TimeoutError`` after ``timeout`` seconds, :class:`Woken` if :meth:`wake` ended the wait first."""
        raise NotImplementedError

    def wake(self) -> None:
        """End the coordinator's wait in :meth:`take` early, because a new request can be sent (the window has
        room). A transport whose wait cannot be interrupted (Ray's blocking get) lets it run to its end."""

    def hung(self, flight: Flight, limit: float) -> list[int]:
        """Stages of ``flight``'s replica to replace because a call ran longer than ``limit`` seconds (empty: the
        micro-batch only waits behind slow ones)."""
        raise NotImplementedError

    def relink(self, replica: int) -> None:
        """Make ``replica`` whole again after some of its workers were replaced."""

    def lost(self, replica: int, stage: int | None, window: Iterable[Flight], force: Flight | None) -> list[Flight]:
        """The micro-batches of ``replica`` in ``window`` to send again after losing stage ``stage`` (``force``:
        also this one, whose result came back as a resource failure), oldest first."""
        raise NotImplementedError

    def resend(self, flight: Flight, stage: int | None) -> bool:
        """Send ``flight`` again from ``stage`` on (whatever the transport can); False if the replica broke
        again (the next take finds out)."""
        raise NotImplementedError

    def forget(self) -> None:
        """Stop waiting for the micro-batches sent so far (their callers were failed)."""

    def close(self) -> None:
        """Close what the transport holds open (wakes a ``take`` that waits)."""


class RayCalls(Transport):
    name = "ray"

    def __init__(self, plan: Plan, placement: Placement):
        self.plan, self.placement = plan, placement
        self._doomed: list = []  # refs of calls a replay replaced: their errors are read once they settle

    def send(self, flight: Flight) -> None:
        self._launch(flight, 0)

    def take(self, flight: Flight, timeout: float) -> tuple:
        self._doomed = _drain(self._doomed)
        try:  # a blocking get; ray.wait costs ~1 ms of driver CPU per call here
            return ray.get(flight.refs[-1], timeout=timeout)
        except GetTimeoutError:
            raise TimeoutError(f"micro-batch {flight.id} not back within {timeout:g} s") from None
        except CALL_ERRORS as e:
            raise Lost(flight.replica, [self._dead_stage(flight.replica, e)], cause_of(e)) from None

    def hung(self, flight: Flight, limit: float) -> list[int]:
        # A busy actor answers nothing until its call ends, so a hang is told by the call's age alone.
        return [self._first_unfinished(flight)] if time.monotonic() - flight.submitted >= limit else []

    def lost(self, replica: int, stage: int | None, window: Iterable[Flight], force: Flight | None) -> list[Flight]:
        return [f for f in window if f.replica == replica and (f is force or not (
            self._first_unfinished(f) > stage or self._finished(f)))]  # else already past the dead worker

    def resend(self, flight: Flight, stage: int | None) -> bool:
        # Stage ``stage``'s input is made (or being made) by a live worker: only the lost calls are reissued.
        self._launch(flight, stage or 0)
        return True

    def _launch(self, flight: Flight, start: int) -> None:
        """(Re)issue stage calls ``start..K-1`` for ``flight``, chaining each output into the next stage. A
        tensor-parallel stage is a chain of steps: every rank's step-``j`` packet goes to every rank's step
        ``j + 1`` (refs only: the ranks read each other's values from the object store, not through here)."""
        self._doomed += flight.refs[start + 1:]
        del flight.refs[start + 1:]
        for stage in [s for s in flight.inner if s >= start]:
            self._doomed += flight.inner.pop(stage)
        flight.submitted = time.monotonic()
        row = self.placement.workers[flight.replica]
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


    def _dead_stage(self, replica: int, error: Exception) -> int:
        """The stage of ``replica`` whose worker died: named by the error, else found by asking each worker."""
        dead_id = _dead_actor_id(error)
        workers = [(stage, w) for stage, ranks in enumerate(self.placement.workers[replica]) for w in ranks]
        for stage, worker in workers:
            if dead_id is not None and worker._actor_id.hex() == dead_id:
                return stage
        probes = [w.__ray_ready__.remote() for _, w in workers]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=5)
        for (stage, _), probe in zip(workers, probes):
            if probe in ready:
                try:
                    ray.get(probe)
                except Exception:  # noqa: BLE001 - this one is dead
                    return stage
        raise WorkerError(f"a stage worker of replica {replica} failed ({cause_of(error)}) but none is found dead")

    def _first_unfinished(self, flight: Flight) -> int:
        """The first stage whose call for ``flight`` has not finished successfully."""
        for stage, ref in enumerate(flight.refs[1:]):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return stage
            try:
                ray.get(ref)
            except CALL_ERRORS:
                return stage
        return len(flight.refs) - 2

    def _finished(self, flight: Flight) -> bool:
        ready, _ = ray.wait([flight.refs[-1]], timeout=0)
        if not ready:
            return False
        try:
            ray.get(flight.refs[-1])
            return True
        except CALL_ERRORS:
            return False


class Links(Transport):
    name = "direct"

    def __init__(self, placement: Placement, timeout_s: float, keep: int):
        self.placement = placement
        nodes = [placement.nodes(replica) for replica in range(len(placement.workers))]
        self.links = _linked(lambda: DirectLinks(placement.workers, nodes, timeout_s, keep))
        self._doomed: list = []  # fetches of held results lost with a replaced last stage

    def send(self, flight: Flight) -> None:
        try:
            self.links.send(flight.replica, flight.id, flight.refs[0])
        except LinkBroken:
            pass  # found when the coordinator waits for this micro-batch: it relinks and resends then

    def take(self, flight: Flight, timeout: float) -> tuple:
        try:
            return self.links.take(flight.replica, flight.id, timeout, wakeable=True)
        except LinkBroken as e:
            raise Lost(flight.replica, self._unresponsive(flight.replica), f"direct link broken ({e})") from None

    def wake(self) -> None:
        self.links.wake()

    def hung(self, flight: Flight, limit: float) -> list[int]:
        # Each worker says how long it has computed its current micro-batch; a stopped one does not answer.
        return self._unresponsive(flight.replica, busy_over=limit)

    def relink(self, replica: int) -> None:
        workers, nodes = self.placement.workers[replica], self.placement.nodes(replica)
        self._doomed = _drain(self._doomed) + _linked(lambda: self.links.connect(replica, workers, nodes))

    def lost(self, replica: int, stage: int | None, window: Iterable[Flight], force: Flight | None) -> list[Flight]:
        return [f for f in window if f.replica == replica and not self.links.has(f.id)]

    def resend(self, flight: Flight, stage: int | None) -> bool:
        flight.submitted = time.monotonic()
        try:
            self.links.send(flight.replica, flight.id, flight.refs[0])
            return True
        except LinkBroken:
            return False

    def forget(self) -> None:
        self.links.forget()

    def close(self) -> None:
        self.links.close()

    def _unresponsive(self, replica: int, busy_over: float | None = None, probe_s: float = PROBE_S) -> list[int]:
        """Stages of ``replica`` whose worker is dead, does not answer within ``probe_s``, or (``busy_over``) has
        been computing one micro-batch for longer than that. A live worker on a loaded machine can take seconds
        to answer: a shorter probe would replace healthy workers (seen at 2 s with the CPUs oversubscribed)."""
        probes = [(stage, w.busy_seconds.remote()) for stage, ranks in enumerate(self.placement.workers[replica])
                  for w in ranks]  # every rank: one that died or hangs stalls its stage's others
        ready, _ = ray.wait([p for _, p in probes], num_returns=len(probes), timeout=probe_s)
        lost = []
        for stage, probe in probes:
            try:
                busy = ray.get(probe) if probe in ready else None
            except CALL_ERRORS:
                busy = None
            if (busy is None or (busy_over is not None and busy > busy_over)) and stage not in lost:
                lost.append(stage)
        return lost


def _drain(refs: list) -> list:
    """Read the errors of abandoned calls that have settled (so Ray does not log them as unhandled); return the
    others."""
    if not refs:
        return refs
    ready, rest = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the call was abandoned: its error is expected
            pass
    return rest


def _linked(make):
    """``make()``, a linking step, with a failure turned into a WorkerError that says what to do."""
    try:
        return make()
    except (OSError, GetTimeoutError, RayActorError) as e:
        raise WorkerError(f"could not link the stage workers over sockets ({cause_of(e)}); use "
                          "transport='ray'") from None


def _dead_actor_id(error: Exception) -> str | None:
    """The hex id of the actor whose death caused ``error`` (Ray wraps it when a later stage needed its output)."""
    while error is not None:
        if isinstance(error, RayActorError) and getattr(error, "actor_id", None):
            return error.actor_id
        error = getattr(error, "cause", None)
    return None

"""What travels between stages: a micro-batch's batch (or the :class:`Failure` that replaced it) with the
:class:`CallStats` of the calls so far, as a packet and as a socket frame's batch and metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """A micro-batch that failed at ``stage``, carried down the pipeline in place of its data."""

    stage: int
    micro_batch: int
    message: str
    kind: str = "WorkerError"


Packet = tuple  # (pa.RecordBatch | Failure, tuple[CallStats, ...])


@dataclass(frozen=True)
class CallStats:
    """What one stage call cost: compute seconds inside ORT, and the bytes it sent on."""

    stage: int
    micro_batch: int
    started: float
    compute_s: float
    sent_bytes: int
    failed: bool = False
    replica: int = 0  # filled in by the coordinator
    rank: int = 0  # tensor-parallel rank, and the step it ran
    step: int = 0
    reduce_s: float = 0.0  # seconds spent making values whole from every rank's packet (in compute_s)


_CALL_FIELDS = [f.name for f in dataclasses.fields(CallStats)]


def packet_to_frame(packet: Packet) -> tuple:
    """A packet as a frame's batch and metadata (a Failure travels as metadata, with no tensors)."""
    data, calls = packet
    meta = {"calls": [[getattr(c, name) for name in _CALL_FIELDS] for c in calls]}  # astuple deep-copies: slow
    if isinstance(data, Failure):
        meta["failure"] = dataclasses.asdict(data)
        return None, meta
    return data, meta


def packet_from_frame(batch, meta: dict) -> Packet:
    calls = tuple(CallStats(*c) for c in meta.get("calls", ()))
    failure = meta.get("failure")
    return (Failure(**failure) if failure else batch), calls


def merged_calls(packets) -> tuple[CallStats, ...]:
    """The calls recorded in every packet, each once (ranks' packets share the calls before them)."""
    seen, calls = set(), []
    for _, stats in packets:
        for c in stats:
            key = (c.stage, c.rank, c.step)
            if key not in seen:
                seen.add(key)
                calls.append(c)
    return tuple(calls)

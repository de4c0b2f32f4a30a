"""What the coordinator tracks: batches of joined requests, the micro-batches in flight, and the records it keeps
of recoveries and skipped batches. Plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxshard.distributed import microbatch
from onnxshard.distributed.requests import Request


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

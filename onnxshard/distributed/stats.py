"""What a pipelined run cost: per-stage busy time, the bubble, bytes moved, throughput."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from onnxshard.workers import CallStats


@dataclass(frozen=True)
class StageStats:
    stage: int
    micro_batches: int
    busy_s: float
    sent_bytes: int
    idle_fraction: float  # 1 - busy / (wall x replicas x ranks): the bubble plus any waiting on other stages
    ranks: int = 1  # tensor-parallel ranks (busy_s sums them)
    reduce_s: float = 0.0  # of busy_s: seconds making values whole across ranks


IMBALANCE = 1.2  # a stage busier than this times the mean stage is worth re-planning for


@dataclass(frozen=True)
class Imbalance:
    """The slowest stage of a run against the mean: what ``stats`` and the CLI report when it is over
    ``IMBALANCE``."""

    slowest: int
    ratio: float  # its busy time over the mean stage's
    shares: tuple[float, ...]  # each stage's share of the busy time (a tensor-parallel stage's per rank)

    def advice(self, model: str | None = None) -> str:
        shares = " / ".join(f"{x:.0%}" for x in self.shares)
        command = (f"onnxshard plan {model or 'MODEL'} --out NEW_PLAN --stages {len(self.shares)} --profile "
                   "[--dim NAME=SIZE ...]")
        return (f"stage {self.slowest} is the bottleneck: {self.ratio:.2f}x the mean stage's busy time (shares "
                f"{shares}); cut where ONNX Runtime's measured per-node times balance: {command}")


def imbalance(busy: list[float], ranks: list[int] | None = None, threshold: float = IMBALANCE) -> Imbalance | None:
    """The slowest stage when it is busier than ``threshold`` x the mean (busy seconds per stage; a stage of
    ``ranks[k]`` tensor-parallel ranks counts its per-rank time); ``None`` when the stages are balanced enough,
    or there is one stage or no work."""
    per_worker = [b / r for b, r in zip(busy, ranks or [1] * len(busy))]
    total = sum(per_worker)
    if len(per_worker) < 2 or total <= 0:
        return None
    mean = total / len(per_worker)
    slowest = max(range(len(per_worker)), key=per_worker.__getitem__)
    ratio = per_worker[slowest] / mean
    if ratio <= threshold:
        return None
    return Imbalance(slowest, ratio, tuple(b / total for b in per_worker))


@dataclass(frozen=True)
class RunStats:
    samples: int
    micro_batches: int
    wall_s: float
    stages: tuple[StageStats, ...]
    replicas: int = 1
    calls: tuple[CallStats, ...] = field(default=(), repr=False)  # the most recent (Tally.KEEP_CALLS) calls
    delivered: int = 0  # micro-batch results stored (each id once)
    replayed: int = 0  # micro-batches re-run after a worker was lost
    model: str | None = None  # the plan's model, for the re-planning advice

    @property
    def imbalance(self) -> Imbalance | None:
        """The slowest stage, when it is over ``IMBALANCE`` x the mean (see :func:`imbalance`)."""
        return imbalance([s.busy_s for s in self.stages], [s.ranks for s in self.stages])

    @property
    def throughput(self) -> float:
        """Samples per second over the whole run."""
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def gpipe_bound(self) -> float:
        """The best efficiency K stages can reach with M micro-batches per replica: M / (M + K - 1)."""
        k = len(self.stages)
        m = self.micro_batches / max(1, self.replicas)
        return m / (m + k - 1) if m else 0.0

    def table(self) -> str:
        lines = [f"{'stage':>5}  {'calls':>13}  {'busy s':>8}  {'idle':>6}  {'sent':>12}"]
        for s in self.stages:
            tp = f"  x{s.ranks} ranks, reduces {s.reduce_s:.3f} s" if s.ranks > 1 else ""
            lines.append(f"{s.stage:>5}  {s.micro_batches:>13}  {s.busy_s:>8.3f}  {s.idle_fraction:>6.1%}  "
                         f"{s.sent_bytes:>12,}{tp}")
        if self.replayed:
            lines.append(f"{self.replayed} micro-batch(es) replayed after losing a worker")
        lines.append(f"{self.samples} samples in {self.micro_batches} micro-batches, {self.wall_s:.3f} s: "
                     f"{self.throughput:.1f} samples/s; GPipe bound M/(M+K-1) = {self.gpipe_bound:.1%}")
        if self.imbalance is not None:
            lines.append(self.imbalance.advice(self.model))
        return "\n".join(lines)


class Tally:
    """Running per-stage totals of a run, plus the most recent calls (for the timeline), so a long stream keeps
    constant memory."""

    KEEP_CALLS = 20_000

    def __init__(self, stages: int | list[int]):
        """``stages``: the number of stages, or each stage's tensor-parallel degree."""
        self.ranks = [1] * stages if isinstance(stages, int) else list(stages)
        n = len(self.ranks)
        self.count = [0] * n
        self.busy = [0.0] * n
        self.reduce = [0.0] * n
        self.sent = [0] * n
        self.calls: deque[CallStats] = deque(maxlen=self.KEEP_CALLS)

    def add(self, calls) -> None:
        for c in calls:
            self.count[c.stage] += 1
            self.busy[c.stage] += c.compute_s
            self.reduce[c.stage] += c.reduce_s
            self.sent[c.stage] += c.sent_bytes
            self.calls.append(c)

    def summary(self, *, replicas: int, samples: int, micro_batches: int, wall_s: float, delivered: int = 0,
                replayed: int = 0) -> RunStats:
        stages = tuple(
            StageStats(k, self.count[k], self.busy[k], self.sent[k],
                       max(0.0, 1.0 - self.busy[k] / (wall_s * replicas * self.ranks[k])) if wall_s > 0 else 0.0,
                       self.ranks[k], self.reduce[k])
            for k in range(len(self.count)))
        return RunStats(samples, micro_batches, wall_s, stages, replicas, tuple(self.calls), delivered, replayed)


class Meter:
    """What one caller's ``run`` or ``stream`` costs, counted by the coordinator's thread as its micro-batches
    finish (several callers' requests may share a micro-batch: each caller counts it). ``progress(done,
    submitted)`` is called after each micro-batch."""

    def __init__(self, ranks: list[int], progress=None):
        self.tally = Tally(ranks)
        self.progress = progress
        self.samples = self.micro_batches = self.done = self.delivered = self.replayed = 0
        self.started = time.perf_counter()

    def add(self, calls) -> None:
        self.tally.add(calls)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.micro_batches)

    def summary(self, replicas: int) -> RunStats:
        return self.tally.summary(replicas=replicas, samples=self.samples, micro_batches=self.micro_batches,
                                  wall_s=time.perf_counter() - self.started, delivered=self.delivered,
                                  replayed=self.replayed)


class CostMeter:
    """Measured compute of each stage per micro-batch: for each micro-batch size seen, a moving average of its
    time (ORT's slow first runs fade out), and across sizes a line a + b x samples fitted to those averages (a
    tensor-parallel stage's time is its ranks' mean). Also the per-call overhead beyond the compute."""

    SMOOTHING = 0.3  # weight of the newest micro-batch in a size's average
    SIZES = 64  # sizes remembered per stage (the most recently seen): a pipeline serving for weeks stays small

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        self.by_size: list[OrderedDict[int, float]] = [OrderedDict() for _ in ranks]
        self.overhead_s: float | None = None  # what a pipeline slot costs beyond its compute, smoothed

    def add(self, calls, samples: int) -> None:
        """The calls of one finished micro-batch of ``samples`` samples."""
        per_stage = [0.0] * len(self.ranks)
        for c in calls:
            per_stage[c.stage] += c.compute_s
        for k, t in enumerate(per_stage):
            t /= self.ranks[k]
            sizes = self.by_size[k]
            old = sizes.get(samples)
            sizes[samples] = t if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * t
            sizes.move_to_end(samples)
            while len(sizes) > self.SIZES:
                sizes.popitem(last=False)

    @property
    def measured(self) -> bool:
        """Whether every stage has finished at least one micro-batch."""
        return all(self.by_size)

    @property
    def only_size(self) -> int | None:
        """The micro-batch size measured so far when it is the only one (on every stage), else ``None``."""
        if len(self.by_size[0]) != 1:  # asked once a batch: the common answer costs one len()
            return None
        (size,) = self.by_size[0]
        return size if all(len(s) == 1 and size in s for s in self.by_size) else None

    def fit(self, k: int) -> tuple[float, float] | None:
        """(a, b): stage ``k`` takes about a + b x samples per micro-batch; ``None`` before any data."""
        points = self.by_size[k]
        if not points:
            return None
        if len(points) == 1:  # one size seen: proportional to the samples
            (size, t), = points.items()
            return 0.0, t / size
        s = np.array(list(points), dtype=float)
        t = np.array(list(points.values()))
        b = max(0.0, float(np.polyfit(s, t, 1)[0]))
        return max(0.0, float(np.mean(t - b * s))), b

    def slot_model(self):
        """samples -> the slowest stage's compute for a micro-batch of that size, fitted once (call only once
        ``measured``)."""
        fits = [self.fit(k) for k in range(len(self.ranks))]
        return lambda samples: max(a + b * samples for a, b in fits)

    def stage_seconds(self, k: int, samples: int) -> float | None:
        """Stage ``k``'s compute for a micro-batch of ``samples``, from the fit; ``None`` before any data."""
        fit = self.fit(k)
        return None if fit is None else fit[0] + fit[1] * samples

    def slot_seconds(self, samples: int) -> float | None:
        """The slowest stage's compute for a micro-batch of ``samples``."""
        return self.slot_model()(samples) if self.measured else None

    def observe(self, run: RunStats) -> None:
        """Learn the per-call overhead from a finished run: its wall time over M/R + K - 1 slots, less the
        slowest stage's compute per slot."""
        m = run.micro_batches / max(1, run.replicas)
        if m < 1 or run.wall_s <= 0:
            return
        slot = run.wall_s / (m + len(run.stages) - 1)
        compute = max(s.busy_s / (s.ranks * run.micro_batches) for s in run.stages)
        seen = max(0.0, slot - compute)
        self.overhead_s = seen if self.overhead_s is None else 0.5 * self.overhead_s + 0.5 * seen

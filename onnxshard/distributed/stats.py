"""What a pipelined run cost: per-stage busy time, the bubble, bytes moved, throughput."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxshard.workers import CallStats


@dataclass(frozen=True)
class StageStats:
    stage: int
    micro_batches: int
    busy_s: float
    sent_bytes: int
    idle_fraction: float  # 1 - busy / (wall x replicas): the bubble plus any waiting on other stages


@dataclass(frozen=True)
class RunStats:
    samples: int
    micro_batches: int
    wall_s: float
    stages: tuple[StageStats, ...]
    replicas: int = 1
    calls: tuple[CallStats, ...] = field(default=(), repr=False)
    delivered: int = 0  # micro-batch results stored (each id once)
    replayed: int = 0  # micro-batches re-run after a worker was lost

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
        lines = [f"{'stage':>5}  {'micro-batches':>13}  {'busy s':>8}  {'idle':>6}  {'sent':>12}"]
        for s in self.stages:
            lines.append(f"{s.stage:>5}  {s.micro_batches:>13}  {s.busy_s:>8.3f}  {s.idle_fraction:>6.1%}  "
                         f"{s.sent_bytes:>12,}")
        if self.replayed:
            lines.append(f"{self.replayed} micro-batch(es) replayed after losing a worker")
        lines.append(f"{self.samples} samples in {self.micro_batches} micro-batches, {self.wall_s:.3f} s: "
                     f"{self.throughput:.1f} samples/s; GPipe bound M/(M+K-1) = {self.gpipe_bound:.1%}")
        return "\n".join(lines)


def summarise(calls: list[CallStats], *, num_stages: int, replicas: int, samples: int, micro_batches: int,
              wall_s: float, delivered: int = 0, replayed: int = 0) -> RunStats:
    stages = []
    for k in range(num_stages):
        mine = [c for c in calls if c.stage == k]
        busy = sum(c.compute_s for c in mine)
        idle = 1.0 - busy / (wall_s * replicas) if wall_s > 0 else 0.0
        stages.append(StageStats(k, len(mine), busy, sum(c.sent_bytes for c in mine), max(0.0, idle)))
    return RunStats(samples, micro_batches, wall_s, tuple(stages), replicas, tuple(calls), delivered, replayed)

"""Running one rank of a tensor-parallel stage, and the reduces between ranks. No Ray: the workers move the
packets, this module says what each step needs and computes it."""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Mapping, Sequence

import numpy as np

from onnxshard.plans import Plan, Reduce, Stage, shares
from onnxshard.runtime.session import RuntimeConfig, ShardSession


def reduce(values: Sequence[np.ndarray], r: Reduce, scratch: bool = False) -> np.ndarray:
    """Make a whole tensor from every rank's part: the sum of partial sums, or the concatenation of slices (for a
    blocked axis, block by block). ``scratch``: the writable parts are this call's alone (frames received for
    it), so a sum of two may go into one of them instead of a new array."""
    if r.op == "sum":
        if scratch and len(values) == 2 and values[0].shape == values[1].shape and \
                values[0].dtype == values[1].dtype:
            a, b = values if values[0].flags.writeable else values[::-1]
            if a.flags.writeable:
                return np.add(a, b, out=a)  # a + b is b + a to the bit
        return functools.reduce(operator.add, values)
    if len(r.blocks) <= 1:
        return np.concatenate(values, axis=r.axis)
    ranks = len(values)
    per_rank = [np.split(v, np.cumsum([shares(b, ranks, r.unit)[k] for b in r.blocks])[:-1], axis=r.axis)
                for k, v in enumerate(values)]
    return np.concatenate([per_rank[k][b] for b in range(len(r.blocks)) for k in range(ranks)], axis=r.axis)


class RankShard:
    """One rank's sessions of a tensor-parallel stage (a session per step this rank runs)."""

    def __init__(self, plan: Plan, stage: Stage, rank: int, config: RuntimeConfig = RuntimeConfig()):
        self.stage, self.rank = stage, rank
        self.sessions = {
            j: ShardSession(plan.root / step.files[rank], step.inputs, step.outputs, config, plan.weights_dir(),
                            label=f"stage {stage.index} rank {rank} step {j}", shared_arena=True)
            for j, step in enumerate(stage.steps) if rank < step.ranks and step.files}

    def steps(self) -> list[int]:
        """The steps this rank runs."""
        return [j for j, step in enumerate(self.stage.steps) if self.rank < step.ranks]

    def wants(self, j: int) -> tuple[list[str], list[str]]:
        """What step ``j`` reads from this rank's own packet, and what it reduces from every rank's packet."""
        step = self.stage.steps[j]
        made = {r.name for r in step.reduces}
        own = [n for n in dict.fromkeys(step.input_names + list(step.carry)) if n not in made]
        return own, list(dict.fromkeys(r.source for r in step.reduces))

    def run(self, j: int, own: Mapping[str, np.ndarray], sources: Sequence[Mapping[str, np.ndarray]], *,
            micro_batch: int | None = None, scratch: bool = False
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
        """Step ``j``: reduce (``scratch``: see :func:`reduce`), run, and return what the session made, what is
        carried on (reduced values included) and the seconds the reduces took."""
        step = self.stage.steps[j]
        env = dict(own)
        t0 = time.perf_counter()
        for r in step.reduces:
            env[r.name] = reduce([s[r.source] for s in sources], r, scratch)
        reduce_s = time.perf_counter() - t0
        made = self.sessions[j].run(env, micro_batch=micro_batch, stage=self.stage.index) if j in self.sessions else {}
        return made, {c: env[c] for c in step.carry}, reduce_s


class TensorParallelStage:
    """All ranks of a tensor-parallel stage in this process, one after another (``verify`` and tests)."""

    def __init__(self, plan: Plan, stage: Stage, config: RuntimeConfig = RuntimeConfig()):
        self.ranks = [RankShard(plan, stage, r, config) for r in range(stage.tensor_parallel)]
        self.stage = stage

    def run(self, feeds: Mapping[str, np.ndarray], *, micro_batch: int | None = None,
            stage: int | None = None) -> dict[str, np.ndarray]:
        packets: list[Mapping[str, np.ndarray]] = [feeds]
        for j, step in enumerate(self.stage.steps):
            nxt = []
            for r in range(step.ranks):
                made, carried, _ = self.ranks[r].run(j, packets[r if len(packets) > 1 else 0], packets,
                                                  micro_batch=micro_batch)
                nxt.append({**made, **carried})
            packets = nxt
        return dict(packets[0])

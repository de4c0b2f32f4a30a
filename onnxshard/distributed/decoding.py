"""The continuous-batching rules for generation, as pure functions of plain data (no Ray).

A *step* runs some sequences' next tokens through every stage. Each step's rows feed the same number of new
tokens (a prefill feeds a whole prompt, a decode one token), and rows of one step may have different cached
lengths: each row's cache is padded on the left to the longest, with the attention mask 0 over the padding and
the positions given per row, so sequences of any length share a decode step. Rows with different numbers of new
tokens cannot share one (the cache is one tensor per layer, its past the same length for every row), so prompts
of equal length are prefilled together and others one step each.

With K stages on their own cores, up to K decode steps are in flight and a sequence is in at most one: the
running sequences are dealt into K groups (vLLM's rule for pipeline parallelism), so every stage has a step to work
on. Prefill steps (of sequences in no other step) may be up to ``PREFILL_DEPTH`` per stage in flight: prompts
differ in length, and with one per stage a stage that finishes a short one would idle while a long one passes the
stages after it.

Stages whose workers share one node's CPUs *take turns* instead: one step in flight, all running sequences in it,
and each stage's session runs as many threads as the workers reserved CPUs together (:func:`turn_threads`). On
shared cores K groups buy no extra compute, and each group's step reads every stage's weights again: a CPU decode
step is mostly that read, so K groups of n rows cost nearly K times one group of K x n (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxshard.runtime.kv_cache import mask_and_positions

PREFILL_DEPTH = 2  # prefill steps in flight per stage, at most


@dataclass(frozen=True)
class Ready:
    """A sequence waiting for its next step: ``new`` tokens to feed (its whole prompt when ``cached`` is 0)."""

    seq: str
    new: int
    cached: int


def turn_threads(nodes: list[str], cpus_per_worker: float, gpus_per_worker: float, ranks: int) -> int | None:
    """The threads each stage's session runs when the stages take turns, or ``None`` when they work at once:
    they take turns when every worker (one per stage, ``nodes`` where each landed) is on one node's CPUs; each then
    runs the CPUs the workers reserved together. GPU stages and tensor-parallel ones (whose ranks run together)
    work at once."""
    if gpus_per_worker or ranks > 1 or len(set(nodes)) != 1:
        return None
    return max(1, round(cpus_per_worker * len(nodes)))


def step_groups(stages: int, turns: bool) -> int:
    """Decode steps in flight: one per stage, or one when the stages take turns."""
    return 1 if turns else stages


def next_step(ready: list[Ready], running: int, groups: int, max_rows: int, max_prefill_tokens: int) -> list[Ready]:
    """The rows of the next step from ``ready`` (oldest first), with ``running`` sequences admitted in all.
    Prefills go first (time to first token), as many prompts of the first one's length as fit
    ``max_prefill_tokens``; then decodes, a ``groups``-th of the running sequences (at least one, at most
    ``max_rows``)."""
    if not ready:
        return []
    prefills = [r for r in ready if r.new > 1]
    if prefills:
        first = prefills[0]
        rows = max(1, min(max_rows, max_prefill_tokens // first.new))
        return [r for r in prefills if r.new == first.new][:rows]
    group = max(1, min(max_rows, math.ceil(running / groups)))
    return ready[:group]


def room(rows: list[Ready], in_flight: int, stages: int, turns: bool = False) -> bool:
    """Whether a step of ``rows`` may go while ``in_flight`` steps are under way: a decode step while fewer than
    one per stage are, a prefill step while fewer than ``PREFILL_DEPTH`` per stage are; when the stages take
    turns, any step while none is."""
    if turns:
        return bool(rows) and in_flight == 0
    return bool(rows) and in_flight < stages * (PREFILL_DEPTH if rows[0].new > 1 else 1)


def step_ids(tokens: list[list[int]], rows: list[Ready]) -> np.ndarray:
    """``input_ids`` for ``rows`` (their sequences' tokens so far in ``tokens``): the ``new`` tokens of each after
    its cached ones. Only the ids travel: each stage makes the mask and positions from the cached lengths itself."""
    new = rows[0].new
    return np.array([t[r.cached:r.cached + new] for t, r in zip(tokens, rows)], np.int64)


def step_inputs(tokens: list[list[int]], rows: list[Ready]) -> dict[str, np.ndarray]:
    """The whole model's inputs for ``rows``: :func:`step_ids`, and the mask over each row's cache (padded on the
    left) and new tokens, and their positions, as each stage makes them."""
    return {"input_ids": step_ids(tokens, rows), **mask_and_positions([r.cached for r in rows], rows[0].new)}


@dataclass(frozen=True)
class Admission:
    """Whether the oldest waiting sequence may start: ``admit``, ``wait`` for others to finish, or ``refuse``
    (it could never fit), with why."""

    verdict: str
    why: str = ""


def admit(need_tokens: int, reserved_tokens: int, capacity_tokens: int | None) -> Admission:
    """A sequence that may grow to ``need_tokens`` (prompt + max_tokens) reserves that much cache in every stage,
    so a running sequence never runs out: it starts when the reservations of the running ones leave room."""
    if capacity_tokens is None:
        return Admission("admit")
    if need_tokens > capacity_tokens:
        return Admission("refuse", f"it may reach {need_tokens} tokens, and kv_cache_memory holds {capacity_tokens} "
                                   "tokens per stage worker; lower max_tokens or the prompt, or raise kv_cache_memory")
    if reserved_tokens + need_tokens > capacity_tokens:
        return Admission("wait")
    return Admission("admit")

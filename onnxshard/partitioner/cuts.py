"""Choosing where to cut a topologically ordered node list into contiguous stages. Pure functions on arrays.

Stage ``k`` holds nodes ``[bounds[k], bounds[k+1])`` (half-open). A cut at position ``p`` sends every tensor
made before ``p`` and read at or after ``p``; ``cut_bytes[p]`` is what that costs per sample (``inf`` where a
non-tensor value would have to cross; ``cut_bytes[n]``: the graph's outputs). A stage costs its nodes' costs plus
``edges = (sent, received)`` per byte it sends on at its end (the graph's outputs too) and reads at its start.
"""

from __future__ import annotations

import numpy as np

from onnxshard.errors import PlanError

BALANCE_SLACK = 0.03  # cuts may make the slowest stage this much slower to send fewer bytes
SHAPE_SLACK = 0.02  # shapes predicted within this of each other count as equal: the one with fewer stages wins


def choose_bounds(cost, params, cut_bytes, stages: int, *, max_memory: float = np.inf,
                  pins=None, shared=(), edges=(0.0, 0.0)) -> list[int]:
    """Bounds of ``stages`` stages that minimise the slowest stage's cost under ``max_memory`` parameter bytes
    per stage, then (within ``BALANCE_SLACK`` of that) the bytes crossing the cuts. ``pins[i]`` is the stage
    node ``i`` must land in, or ``None``. ``params[i]`` counts the weights node ``i`` is the first to read;
    ``shared`` lists ``(bytes, reader positions)`` of weights several nodes read (tied embeddings), which every
    stage holding one of their readers holds too; ``edges``: see the module's doc."""
    n = len(cost)
    if stages < 1:
        raise PlanError(f"stages must be at least 1 (got {stages})")
    if stages > n:
        raise PlanError(f"cannot cut {n} nodes into {stages} stages; use --stages {n} or fewer")
    cparams = np.concatenate([[0.0], np.cumsum(np.asarray(params, dtype=float))])
    cut = np.asarray(cut_bytes, dtype=float)
    costs = _Costs(cost, cut, edges)
    allowed = _pin_masks(pins, stages, n)
    memory = _Memory(cparams, max_memory, shared)
    best = _minimax(costs, cut, stages, memory, allowed)
    if not np.isfinite(best):
        return None
    limit = best * (1 + BALANCE_SLACK) + 1e-9
    return _min_bytes(costs, cut, stages, memory, limit, allowed)


class _Costs:
    """What stage ``[i, j)`` costs: its nodes, plus ``edges`` per byte it reads at ``i`` and sends at ``j``."""

    def __init__(self, cost, cut, edges):
        self.ccost = np.concatenate([[0.0], np.cumsum(np.asarray(cost, dtype=float))])
        crossing = np.zeros(len(self.ccost))  # no cut_bytes[n] given: the outputs cost nothing
        crossing[:len(cut)] = np.where(np.isfinite(cut), cut, 0.0)  # a cut no value may cross is refused elsewhere
        sent, received = edges
        self.sent, self.received = sent * crossing, received * crossing
        self.received[0] = 0.0  # the graph's inputs: fed to a whole model too

    def ending_at(self, j: int) -> np.ndarray:
        """Over start positions i < j."""
        return self.ccost[j] - self.ccost[:j] + self.sent[j] + self.received[:j]

    def of(self, bounds) -> list[float]:
        return [float(self.ending_at(b)[a]) for a, b in zip(bounds, bounds[1:])]


def boundary_costs(cut_bytes, bounds, edges) -> list[float]:
    """What each stage of ``bounds`` pays, per ``edges``, for the bytes it reads at its start and sends at its end."""
    return _Costs(np.zeros(bounds[-1]), np.asarray(cut_bytes, dtype=float), edges).of(bounds)


class _Memory:
    """Which stages ``[i, j)`` fit ``max_memory`` bytes of weights, shared weights counted in each stage."""

    def __init__(self, cparams, max_memory: float, shared):
        self.cparams, self.max_memory = cparams, max_memory
        self.shared = [(size, sorted(readers)) for size, readers in shared] if np.isfinite(max_memory) else []

    def fits(self, j: int) -> np.ndarray:
        """Over start positions i < j."""
        held = self.cparams[j] - self.cparams[:j]
        for size, readers in self.shared:
            before = [r for r in readers if r < j]
            if before:  # [i, j) holds a reader but not the first one (counted there) when first < i <= last
                held[readers[0] + 1:before[-1] + 1] += size
        return held <= self.max_memory


def choose_shape(cost, params, cut_bytes, workers: int, *, degree: int = 1, max_memory: float = np.inf,
                 most: int | None = None, shared=(), edges=(0.0, 0.0)) -> tuple[int, int] | None:
    """(stages, replicas) for ``workers`` workers, each stage taking ``degree`` of them, with the best predicted
    throughput: replicas over the slowest stage's cost (a pipeline's steady state), every stage within
    ``max_memory``. Near-equal shapes go to fewer stages (no bubble, no hops): a model whose one node is most of the
    work gets replicas of one stage, an evenly layered one that fits a worker too; a memory cap forces stages.
    ``None`` when no shape fits."""
    costs = _Costs(cost, np.asarray(cut_bytes, dtype=float), edges)
    best = None
    for stages in range(1, workers // degree + 1):
        if most is not None and stages > most:
            break
        bounds = choose_bounds(cost, params, cut_bytes, stages, max_memory=max_memory, shared=shared, edges=edges)
        if bounds is None:
            continue
        slowest = max(costs.of(bounds))
        replicas = workers // (stages * degree)
        rate = replicas / max(slowest, 1e-30)
        if best is None or rate > best[0] * (1 + SHAPE_SLACK):
            best = (rate, stages, replicas)
    return None if best is None else best[1:]


def fewest_stages(cost, params, cut_bytes, max_memory: float, *, pins=None, most: int | None = None,
                  shared=()) -> int:
    """The smallest stage count whose stages each hold at most ``max_memory`` parameter bytes."""
    n = len(cost)
    if max(params, default=0) > max_memory:
        return 0  # one node alone is over the cap: no stage count helps
    first = max(1, int(np.ceil(sum(params) / max_memory))) if max_memory > 0 else 1
    for s in range(first, min(n, most or n) + 1):
        if choose_bounds(cost, params, cut_bytes, s, max_memory=max_memory, pins=pins, shared=shared) is not None:
            return s
    return 0


def _pin_masks(pins, stages, n):
    """``allowed[k][i, j]`` is implied by ``bad[k][j] - bad[k][i] == 0``: no node pinned elsewhere in [i, j)."""
    if pins is None or all(p is None for p in pins):
        return None
    bad = np.zeros((stages, n + 1))
    for k in range(stages):
        bad[k, 1:] = np.cumsum([p is not None and p != k for p in pins])
    return bad


def _segments_ok(k, j, segment, memory: _Memory, allowed, limit=np.inf):
    """Boolean mask over start positions i < j for which [i, j) (costing ``segment[i]``) may be stage ``k``."""
    ok = memory.fits(j) & (segment <= limit)
    if allowed is not None:
        ok &= allowed[k, j] - allowed[k, :j] == 0
    return ok


def _minimax(costs: _Costs, cut, stages, memory: _Memory, allowed) -> float:
    n = len(costs.ccost) - 1
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    for k in range(stages):
        g = np.full(n + 1, np.inf)
        for j in range(k + 1, n + 1):
            segment = costs.ending_at(j)
            ok = _segments_ok(k, j, segment, memory, allowed)
            ok &= np.isfinite(f[:j])
            if k > 0:
                ok &= np.isfinite(cut[:j])
            ok[:k] = False
            if ok.any():
                g[j] = np.max([f[:j][ok], segment[ok]], axis=0).min()
        f = g
    return f[n]


def _min_bytes(costs: _Costs, cut, stages, memory: _Memory, limit, allowed) -> list[int]:
    """Least bytes crossing the cuts; among equals, the most even stages (least sum of squared stage costs)."""
    n = len(costs.ccost) - 1
    scale = max(costs.ccost[n], 1e-12)
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    sq = np.zeros(n + 1)
    back = np.zeros((stages, n + 1), dtype=int)
    for k in range(stages):
        g, gsq = np.full(n + 1, np.inf), np.zeros(n + 1)
        for j in range(k + 1, n + 1):
            segment = costs.ending_at(j)
            ok = _segments_ok(k, j, segment, memory, allowed, limit)
            ok[:k] = False
            if not ok.any():
                continue
            total = np.where(ok, f[:j] + (cut[:j] if k > 0 else 0.0), np.inf)
            lowest = total.min()
            if not np.isfinite(lowest):
                continue
            evenness = np.where(total <= lowest + 1e-9 * max(1.0, lowest),
                                sq[:j] + (segment / scale) ** 2, np.inf)
            i = int(np.argmin(evenness))
            g[j], gsq[j], back[k, j] = total[i], evenness[i], i
        f, sq = g, gsq
    bounds = [n]
    for k in range(stages - 1, -1, -1):
        bounds.append(int(back[k, bounds[-1]]))
    return bounds[::-1]


def cut_bytes_per_position(n: int, intervals, sizes) -> np.ndarray:
    """``intervals`` are (made_at, last_read_at) node positions per tensor (-1 for graph inputs); a tensor
    crosses cut ``p`` when ``made_at < p <= last_read_at``. ``sizes`` may hold ``inf``."""
    finite = np.zeros(n + 2)
    blocked = np.zeros(n + 2)
    for (made, last), size in zip(intervals, sizes):
        lo, hi = made + 1, last + 1  # cuts lo..last cross it
        if lo > last:
            continue
        if np.isfinite(size):
            finite[lo] += size
            finite[hi] -= size
        else:
            blocked[lo] += 1
            blocked[hi] -= 1
    out = np.cumsum(finite)[: n + 1]
    out[np.cumsum(blocked)[: n + 1] > 0] = np.inf
    out[0] = 0.0
    return out

"""How big micro-batches are, and whether a batch fits in memory: pure functions of measured costs, no Ray.

With K stages, micro-batches of s samples and M = ceil(B / s) of them per replica for B samples per replica, a batch
alone takes about (M + K - 1)(t(s) + o): the pipeline fills and drains (K - 1 extra slots), each slot lasts the
slowest stage's compute t(s) (a line a + b s fitted to the measured micro-batches: a is what a call costs whatever
its size, such as an LSTM's sequential steps) plus the per-call overhead o. The n-th batch of a stream shares the
fill and drain with the n - 1 before it, so it minimises (n M + K - 1)(t(s) + o): a short stream of big batches is
split as a batch alone is, a long stream of small requests tends to one micro-batch per request. While a single
size has been measured, the line cannot be fitted: t(s) is taken as proportional to s, and the next choice of that
same size is doubled once, so that the fit sees a second size (see ``explore``).
"""

from __future__ import annotations

from collections.abc import Callable

from onnxshard.errors import InputError
from onnxshard.plans import Plan, spec_bytes
from onnxshard.runtime.session import feed_dims
from onnxshard.units import human_bytes

MAX_CANDIDATES = 512  # micro-batch counts tried per batch


def best_size(per_replica: int, *, stages: int, slot: Callable[[int], float], overhead_s: float, requests: int = 1,
              largest: int | None = None) -> int:
    """Samples per micro-batch that minimise (requests x M + K - 1)(slot(s) + overhead_s) for ``per_replica``
    samples, among sizes up to ``largest``: one candidate per count of micro-batches, the smallest size giving it."""
    largest = per_replica if largest is None else max(1, min(largest, per_replica))
    sizes = {min(largest, -(-per_replica // m)) for m in range(1, min(per_replica, MAX_CANDIDATES) + 1)}
    return min(sorted(sizes), key=lambda s: (requests * -(-per_replica // s) + stages - 1) * (slot(s) + overhead_s))


def auto_size(meter, per_replica: int, *, stages: int, overhead_s: float, requests: int = 1,
              largest: int | None = None, slot: Callable[[int], float] | None = None) -> int:
    """:func:`best_size` for the stage costs measured by ``meter`` (a ``stats.CostMeter``; ``slot``: its
    ``slot_model()``, when the caller has it already), then :func:`explore`."""
    size = best_size(per_replica, stages=stages, slot=slot or meter.slot_model(), overhead_s=overhead_s,
                     requests=requests, largest=largest)
    return explore(size, meter.only_size, per_replica if largest is None else min(largest, per_replica))


def explore(size: int, only: int | None, most: int) -> int:
    """``size``, unless it is ``only``, the one size measured so far: then twice that (up to ``most``). One size
    cannot tell a call's fixed cost from its per-sample cost; the proportional guess in its place favours small
    micro-batches and, left alone, would choose the same size forever (an LSTM's stream at 2 samples a call)."""
    return size if only is None or size != only else max(1, min(2 * size, most))


def stream_cap(sample_bytes: int, *, stages: int, window: int, byte_limit: float) -> int:
    """The largest micro-batch of a stream whose micro-batches in flight hold at most a quarter of ``byte_limit``
    (``sample_bytes``: a sample at the widest stage boundary)."""
    return max(1, int(byte_limit / 4 // max(1, sample_bytes * (stages + 1) * window)))


def sample_bytes(plan: Plan, axes, feeds, cache: dict | None = None) -> tuple[int, int]:
    """Bytes one sample of ``feeds`` takes at the widest stage boundary, and in the outputs. ``cache``: a dict
    of earlier answers by dim sizes (a stream of equal requests asks the same question each time; kept to 64)."""
    dims = feed_dims(feeds, plan.inputs)
    if axes is not None:  # per sample: the batch dim counts once
        for t in plan.inputs:
            axis = axes.inputs.get(t.name)
            if axis is not None and t.shape and isinstance(t.shape[axis], str):
                dims[t.shape[axis]] = 1
    key = tuple(dims.items())
    if cache is not None and key in cache:
        return cache[key]

    def total(names):
        return sum(spec_bytes(plan.spec(n), dims) for n in names)

    answer = max(total(s.output_names + list(s.carry)) for s in plan.stages), total(plan.output_names)
    if cache is not None:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = answer
    return answer


def check_fits(per_sample: tuple[int, int], samples: int, count: int, *, stages: int, window: int,
               limit: float) -> None:
    """Refuse a batch of ``samples`` cut into ``count`` micro-batches that would need more than ``limit`` bytes
    (its activations in flight, or its outputs), saying how much, instead of exhausting memory."""
    boundary, output = per_sample
    in_flight = min(count, window) * -(-samples // count) * boundary * (stages + 1)
    outputs = samples * output
    need = max(in_flight, outputs)
    if need > limit:
        raise InputError(f"this batch would need about {human_bytes(need)} ({human_bytes(in_flight)} of "
                         f"activations in flight, {human_bytes(outputs)} of outputs), over the "
                         f"{human_bytes(limit)} allowed; send smaller batches or micro-batches, or raise "
                         "max_batch_bytes / Ray's object store memory")

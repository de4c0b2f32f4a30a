"""Splitting a batch into micro-batches and merging results back: a matching pair.

``split`` cuts every input that has a batch axis into consecutive chunks of ``size`` along that axis (the last
chunk may be smaller; a batch of ``size`` or fewer is one micro-batch) and hands every input without a batch axis
whole to each micro-batch (broadcast). An :class:`Assembly` puts each output's chunks back in order along its
batch axis as they arrive. Chunks are numpy views: splitting copies nothing.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from onnxshard.errors import InputError
from onnxshard.plans import Plan, TensorSpec, is_batch_name

# Symbolic dim names that exporters use for the batch (torch: batch_size, N; TF: unk__, Keras: None -> "N").


@dataclass(frozen=True)
class BatchAxes:
    """The batch axis of each model input and output; ``None`` for a tensor without one (broadcast / whole)."""

    inputs: dict[str, int | None]
    outputs: dict[str, int | None]

    @property
    def splittable(self) -> bool:
        return any(a is not None for a in self.inputs.values()) and all(a is not None for a in self.outputs.values())


def infer_batch_axes(plan: Plan, given: dict[str, int | None] | str | None = None) -> BatchAxes | None:
    """Batch axes from the model, or ``None`` (with a warning) when they cannot be known.

    ``given`` is either the symbolic dim name of the batch, or a map of tensor name -> axis (``None`` for no batch
    axis); names the map leaves out are inferred from the dim the map's axes point at.
    """
    if isinstance(given, dict):
        return _axes_from_map(plan, given)
    if isinstance(given, str):
        dim = given
        if not any(_axis(t, dim) is not None for t in plan.inputs):
            raise InputError(f"batch dim {dim!r} appears in no model input; inputs are "
                             f"{[(t.name, t.shape) for t in plan.inputs]}")
    else:
        dim = _guess_dim(plan)
        if dim is None:
            return None
    axes = BatchAxes({t.name: _axis(t, dim) for t in plan.inputs}, {t.name: _axis(t, dim) for t in plan.outputs})
    if not axes.splittable:
        whole = [n for n, a in axes.outputs.items() if a is None]
        warnings.warn(f"outputs {whole} have no batch dim {dim!r}: the whole batch runs as one micro-batch; pass "
                      "batch_axes to say how to split", stacklevel=3)
        return None
    return axes


def batch_dim(plan: Plan, axes: BatchAxes | None) -> str | None:
    """The symbolic dim name the batch axes point at (``None``: no batch axis, or a fixed size)."""
    if axes is None:
        return None
    for t in plan.inputs:
        axis = axes.inputs.get(t.name)
        if axis is not None and t.shape and isinstance(t.shape[axis], str):
            return t.shape[axis]
    return None


def _axes_from_map(plan: Plan, given: dict[str, int | None]) -> BatchAxes:
    """Axes the user named, and for the other tensors the axis of the dim those axes point at."""
    tensors = {t.name: t for t in plan.inputs + plan.outputs}
    unknown = [n for n in given if n not in tensors]
    if unknown:
        raise InputError(f"batch_axes names {unknown}, which are not model inputs or outputs ({list(tensors)})")
    pointed = set()
    for name, axis in given.items():
        shape = tensors[name].shape
        if axis is None or shape is None:
            continue
        if not 0 <= axis < len(shape):
            raise InputError(f"batch_axes[{name!r}] = {axis}, but {name!r} has rank {len(shape)}")
        pointed.add(shape[axis])
    dim = pointed.pop() if len(pointed) == 1 else None
    dim = dim if isinstance(dim, str) else None
    return BatchAxes({t.name: given[t.name] if t.name in given else _axis(t, dim) for t in plan.inputs},
                     {t.name: given[t.name] if t.name in given else _axis(t, dim) for t in plan.outputs})


def _axis(t: TensorSpec, dim: str | None) -> int | None:
    if dim is None or t.shape is None:
        return None
    hits = [i for i, d in enumerate(t.shape) if d == dim]
    return hits[0] if len(hits) == 1 else None


def _guess_dim(plan: Plan) -> str | None:
    """A symbolic dim shared by inputs and outputs; if several are, only a conventional batch name decides."""
    def names(specs):
        return {d for t in specs if t.shape for d in t.shape if isinstance(d, str)}

    shared = names(plan.inputs) & names(plan.outputs)
    if len(shared) == 1:
        return shared.pop()
    conventional = [d for d in shared if is_batch_name(d)]
    if len(conventional) == 1:
        return conventional[0]
    reason = f"symbolic dims {sorted(shared)} are all shared by inputs and outputs" if shared else \
        "no symbolic dim is shared by inputs and outputs"
    warnings.warn(f"cannot tell the batch axis ({reason}): the whole batch runs as one micro-batch; pass "
                  "batch_axes={'input': axis, ...} or batch_axes='dim_name' to pipeline micro-batches", stacklevel=3)
    return None


def batch_size(feeds: dict[str, np.ndarray], axes: BatchAxes | None) -> int:
    """The batch size all batched inputs agree on (1 when the batch is not split)."""
    if axes is None:
        return 1
    sizes = {name: feeds[name].shape[a] for name, a in axes.inputs.items() if a is not None and name in feeds}
    if len(set(sizes.values())) > 1:
        raise InputError(f"inputs disagree on the batch size: {sizes}; give every batched input the same size")
    size = next(iter(sizes.values()), 1)
    if size == 0:
        raise InputError(f"empty batch: {next(iter(sizes))!r} has 0 rows on its batch axis; send at least one")
    return size


def split(feeds: dict[str, np.ndarray], axes: BatchAxes | None, size: int | None) -> list[dict[str, np.ndarray]]:
    """Micro-batches of ``size`` along each input's batch axis (views); broadcast inputs go to every one."""
    total = batch_size(feeds, axes)
    if axes is None or not size or size >= total:
        return [feeds]
    starts = range(0, total, size)
    chunks = []
    for start in starts:
        chunk = {}
        for name, value in feeds.items():
            axis = axes.inputs.get(name)
            if axis is None:
                chunk[name] = value
            else:
                index = [slice(None)] * value.ndim
                index[axis] = slice(start, start + size)
                chunk[name] = value[tuple(index)]
        chunks.append(chunk)
    return chunks


def run_per_micro_batch(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds: dict[str, np.ndarray],
                        axes: BatchAxes, size: int) -> dict[str, np.ndarray]:
    """``run`` on each micro-batch of ``size`` samples, the outputs put back together: what a pipeline computes,
    done in this process (ONNX Runtime's kernels, and so its rounding, can depend on the batch size)."""
    chunks = split(feeds, axes, size)
    assembly = Assembly([batch_size(c, axes) for c in chunks], axes)
    for i, chunk in enumerate(chunks):
        assembly.add(i, run(chunk))
    return assembly.outputs


class ArrayPool:
    """Large output arrays whose memory is used again once the caller lets go of them.

    A fresh allocation of hundreds of MB is paid for in page faults as it is first written: on the 2-core VM, with
    the stages running, ~44 ms per 51 MB, so a GPT-2-sized batch's 411 MB of logits cost the coordinator 0.35 s of
    CPU each time (benchmarks/RESULTS.md); memory handed back costs nothing to reuse, as in ORT's own arena. An
    array from :meth:`empty` is an ordinary writable numpy array; when it and every view of it are gone, its buffer
    comes back here for the next array of the same size. At most ``per_size`` free buffers of one size and
    ``max_free_bytes`` in all are kept; arrays under ``min_bytes`` are plain allocations."""

    def __init__(self, max_free_bytes: int = 1 << 30, min_bytes: int = 4 << 20, per_size: int = 2):
        self.max_free_bytes, self.min_bytes, self.per_size = max_free_bytes, min_bytes, per_size
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < self.min_bytes or dtype.hasobject:
            return np.empty(shape, dtype)
        with self._lock:
            free = self._free.get(nbytes)
            raw = free.pop() if free else None
        if raw is None:
            raw = np.empty(nbytes, np.uint8)
        lease = _Lease(raw, tuple(shape), dtype)
        weakref.finalize(lease, self._give_back, raw).atexit = False
        return np.asarray(lease)  # its base is the lease, which every view keeps alive

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._free_bytes()

    def close(self) -> None:
        """Let go of the free buffers, and of those handed back from now on."""
        with self._lock:
            self._free.clear()
            self._closed = True

    def _give_back(self, raw: np.ndarray) -> None:
        with self._lock:
            if self._closed:
                return
            free = self._free.setdefault(raw.nbytes, [])
            if len(free) < self.per_size and self._free_bytes() + raw.nbytes <= self.max_free_bytes:
                free.append(raw)

    def _free_bytes(self) -> int:  # with the lock held
        return sum(raw.nbytes for buffers in self._free.values() for raw in buffers)


class _Lease:
    """A pooled buffer seen as an array (numpy's array interface); numpy keeps it as the base of that array."""

    def __init__(self, raw: np.ndarray, shape: tuple, dtype: np.dtype):
        self.raw = raw
        self.__array_interface__ = {"data": (raw.ctypes.data, False), "shape": shape, "typestr": dtype.str,
                                    "version": 3}


class Assembly:
    """One batch's outputs, put together as its micro-batches come back: each part is copied into place when it
    arrives, so the copying overlaps the pipeline's work instead of following it (the inverse of :func:`split`).
    ``pool``: where large output arrays come from (see :class:`ArrayPool`)."""

    def __init__(self, sizes: list[int], axes: BatchAxes | None, pool: ArrayPool | None = None):
        self._empty = pool.empty if pool is not None else np.empty
        self.axes = axes
        self.offsets = [0, *itertools.accumulate(sizes)]  # plain ints: numpy costs more for a request's one part
        self.missing = set(range(len(sizes)))
        self.outputs: dict[str, np.ndarray] = {}

    @property
    def done(self) -> bool:
        return not self.missing

    def add(self, index: int, part: dict[str, np.ndarray]) -> bool:
        """Put micro-batch ``index``'s outputs in place (copied: ``part`` may view a buffer that is reused or
        read-only). A batch of one part keeps the part's writable arrays as they are: pass them writable only
        when nothing else uses their memory (``arrow.decode(..., writable=True)``). False if that part is
        already in (a replayed duplicate)."""
        if index not in self.missing:
            return False
        self.missing.discard(index)
        if len(self.offsets) == 2:
            self.outputs = {name: value if value.flags.writeable else self._copy(value) for name, value in part.items()}
            return True
        for name, value in part.items():
            axis = self.axes.outputs[name]
            if name not in self.outputs:
                shape = list(value.shape)
                shape[axis] = int(self.offsets[-1])
                self.outputs[name] = self._empty(shape, value.dtype)
            where = [slice(None)] * value.ndim
            where[axis] = slice(self.offsets[index], self.offsets[index + 1])
            self.outputs[name][tuple(where)] = value
        return True

    def _copy(self, value: np.ndarray) -> np.ndarray:
        out = self._empty(value.shape, value.dtype)
        out[...] = value
        return out


def coalesce(batches: Iterable[dict[str, np.ndarray]], axes: BatchAxes, max_samples: int,
             check: Callable[[dict[str, np.ndarray]], None] = lambda feeds: None,
             ) -> Iterator[tuple[dict[str, np.ndarray], list[int]]]:
    """Consecutive requests joined along their batch axes into batches of at most ``max_samples`` samples (a
    request bigger than that stays alone), with each batch's request sizes. Requests join only while their
    inputs without a batch axis are equal. ``check`` vets each request before it joins one."""
    group: list[dict[str, np.ndarray]] = []
    sizes: list[int] = []

    def joined():
        return group[0] if len(group) == 1 else join(group, axes)

    for feeds in batches:
        check(feeds)
        n = batch_size(feeds, axes)
        fits = group and sum(sizes) + n <= max_samples and all(
            np.array_equal(feeds[name], group[0][name]) for name, axis in axes.inputs.items()
            if axis is None and name in feeds)
        if group and not fits:
            yield joined(), sizes
            group, sizes = [], []
        group.append(feeds)
        sizes.append(n)
    if group:
        yield joined(), sizes


def join(requests: list[dict[str, np.ndarray]], axes: BatchAxes) -> dict[str, np.ndarray]:
    """Requests' feeds joined along their batch axes (inputs without one are taken from the first: callers join
    only requests whose such inputs are equal); the inverse of :func:`unmerge`."""
    return {name: value if axes.inputs.get(name) is None else
            np.concatenate([r[name] for r in requests], axis=axes.inputs[name]) for name, value in requests[0].items()}


def unmerge(outputs: dict[str, np.ndarray], axes: BatchAxes, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Each request's outputs back from a coalesced batch (views)."""
    cuts = np.cumsum(sizes)[:-1]
    per_name = {name: np.split(value, cuts, axis=axes.outputs[name]) for name, value in outputs.items()}
    return [{name: parts[i] for name, parts in per_name.items()} for i in range(len(sizes))]

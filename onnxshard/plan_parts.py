"""The parts of a plan: tensor specs at stage boundaries, stages and the steps and reduces of a tensor-parallel
stage, as frozen data that round-trips through ``plan.json`` (see :mod:`onnxshard.plans`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from onnxshard import dtypes
from onnxshard.errors import PlanError

Dim = int | str | None


NON_TENSOR = "non-tensor"  # the dtype of a sequence, map or optional value (only at a model's own inputs and outputs)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor at a boundary: its name, element type and shape (symbolic dims kept as names; ``None`` unknown)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        if d.get("dtype") not in dtypes.NAMES and d.get("dtype") != NON_TENSOR:
            raise PlanError(f"tensor {d.get('name')!r} has unknown dtype {d.get('dtype')!r}")
        shape = d.get("shape")
        return cls(str(d["name"]), d["dtype"], None if shape is None else tuple(shape))


def shares(size: int, degree: int, unit: int = 1) -> tuple[int, ...]:
    """Each tensor-parallel rank's part of ``size``, in whole ``unit``s, as even as they go: the first ranks take one unit more
    when ``degree`` does not divide the count (no padding, as the vocabulary of GPT-2 or BERT needs)."""
    units, extra = divmod(size // unit, degree)
    return tuple((units + (r < extra)) * unit for r in range(degree))


def starts(size: int, degree: int, unit: int = 1) -> tuple[int, ...]:
    """Where each rank's part of ``size`` begins."""
    parts = shares(size, degree, unit)
    return tuple(sum(parts[:r]) for r in range(degree))


BATCH_NAMES = re.compile(r"^(batch|batch_size|batchsize|bs|n|b|num_batches|batch_dim)$", re.IGNORECASE)


def is_batch_name(dim: str) -> bool:
    """Whether a symbolic dim has one of the names exporters give the batch."""
    return bool(BATCH_NAMES.match(dim))


def unsized(cost_dims: dict[str, int | None]) -> list[str]:
    """The symbolic dims other than the batch that costs counted as 1 (costs are per sample: the batch never
    counts)."""
    return [d for d, n in cost_dims.items() if n is None and not is_batch_name(d)]


@dataclass(frozen=True)
class Reduce:
    """Make ``name`` whole from every rank's ``source``: ``sum`` them (all-reduce) or ``concat`` them along
    ``axis`` (all-gather; with ``blocks``, the axis is a row of blocks of those whole sizes, each cut in T, in
    whole ``unit``s when T does not divide them evenly)."""

    name: str
    source: str
    op: str
    axis: int = 0
    blocks: tuple[int, ...] = ()
    unit: int = 1

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "op": self.op, "axis": self.axis,
                "blocks": list(self.blocks), "unit": self.unit}

    @classmethod
    def from_json(cls, d: dict) -> Reduce:
        if d.get("op") not in ("sum", "concat"):
            raise PlanError(f"reduce of {d.get('name')!r} has unknown op {d.get('op')!r}")
        return cls(str(d["name"]), str(d["source"]), d["op"], int(d.get("axis", 0)),
                   tuple(int(b) for b in d.get("blocks", ())), int(d.get("unit", 1)))


@dataclass(frozen=True)
class Step:
    """One step of a tensor-parallel stage: first the ``reduces`` (each rank gathers what it needs whole from
    every rank's previous packet), then ``files[r]`` runs on rank ``r``. ``ranks`` ranks run it: all T, or rank 0
    alone for the replicated tail after the last reduce. A step with no files only reduces and hands on."""

    ranks: int
    files: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    carry: tuple[str, ...] = ()
    reduces: tuple[Reduce, ...] = ()
    sha256: tuple[str, ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def to_json(self) -> dict:
        return {"ranks": self.ranks, "files": list(self.files), "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs], "carry": list(self.carry),
                "reduces": [r.to_json() for r in self.reduces], "sha256": list(self.sha256)}

    @classmethod
    def from_json(cls, d: dict) -> Step:
        return cls(int(d["ranks"]), tuple(d["files"]), specs_from_json(d["inputs"]),
                   specs_from_json(d["outputs"]), tuple(d.get("carry", ())),
                   tuple(Reduce.from_json(r) for r in d.get("reduces", ())), tuple(d.get("sha256", ())))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a standalone ONNX file plus the names it reads, writes and passes through.

    ``carry`` names tensors the stage receives and hands on unchanged (skip connections to later stages and
    graph outputs made earlier); the batch a stage sends on is its ``outputs`` plus its ``carry``.

    With ``tensor_parallel`` T > 1 the stage runs on T rank workers as ``steps`` (``file`` is empty);
    ``rank_param_bytes`` is what each rank holds and ``notes`` says which layers stayed whole and why.
    """

    index: int
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    carry: tuple[str, ...] = ()
    nodes: int = 0
    param_bytes: int = 0
    flops: float = 0.0
    work: float = 0.0  # FLOPs plus the activation bytes moved, as FLOP-equivalents: the analytic cost balanced
    boundary_work: float = 0.0  # the bytes it reads at its start and sends on at its end, as FLOP-equivalents
    sends_bytes: int = 0
    sha256: str = ""
    tensor_parallel: int = 1
    steps: tuple[Step, ...] = ()
    rank_param_bytes: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def files(self) -> list[tuple[str, str]]:
        """Every ONNX file of the stage with its recorded sha256."""
        if not self.steps:
            return [(self.file, self.sha256)]
        return [(f, h) for step in self.steps for f, h in zip(step.files, step.sha256 or ("",) * len(step.files))]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        d["carry"] = list(self.carry)
        d["steps"] = [step.to_json() for step in self.steps]
        d["rank_param_bytes"] = list(self.rank_param_bytes)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Stage:
        return cls(
            index=int(d["index"]), file=str(d["file"]),
            inputs=specs_from_json(d["inputs"]),
            outputs=specs_from_json(d["outputs"]),
            carry=tuple(d.get("carry", ())), nodes=int(d.get("nodes", 0)), param_bytes=int(d.get("param_bytes", 0)),
            flops=float(d.get("flops", 0.0)), work=float(d.get("work", d.get("flops", 0.0))),
            boundary_work=float(d.get("boundary_work", 0.0)),
            sends_bytes=int(d.get("sends_bytes", 0)), sha256=str(d.get("sha256", "")),
            tensor_parallel=int(d.get("tensor_parallel", 1)), steps=tuple(Step.from_json(x) for x in d.get("steps", ())),
            rank_param_bytes=tuple(int(b) for b in d.get("rank_param_bytes", ())), notes=tuple(d.get("notes", ())),
        )


def spec_bytes(spec: TensorSpec, dims: dict[str, int] | None = None) -> int:
    """Bytes of ``spec`` with symbolic dims sized by ``dims`` (others, and unknown dims, count as 1)."""
    n = 1
    for d in spec.shape or ():
        n *= d if isinstance(d, int) and d > 0 else (dims or {}).get(d, 1) if isinstance(d, str) else 1
    return n * dtypes.itemsize(spec.dtype)


def specs_from_json(items) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise TypeError(f"a tensor list must be a list of objects, got {items!r:.60}")
    return tuple(TensorSpec.from_json(t) for t in items)

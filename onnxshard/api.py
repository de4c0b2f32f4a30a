"""The Python API: plan a model, load a plan, verify a split. Brings the partitioner and ONNX Runtime together."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxshard import partitioner
from onnxshard.errors import InputError, PlanError
from onnxshard.plans import Plan, is_batch_name, is_plan_dir
from onnxshard.runtime import tools
from onnxshard.units import parse_bytes

DEFAULT_TOLERANCE = 1e-5


def plan(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    stages: int | None = None,
    cuts: Sequence[str] = (),
    max_stage_memory: int | str | None = None,
    profile: bool = False,
    profile_feeds: dict | None = None,
    optimize: bool = False,
    copy_weights: bool = False,
    dims: dict[str, int] | None = None,
    allow_domains: Iterable[str] = (),
    tensor_parallel: int | None = None,
    hash_weights: bool = False,
    kv_pairs: dict[str, str] | None = None,
    example_inputs: dict | None = None,
    workers: int | None = None,
) -> Plan:
    """Split ``model`` into pipeline stages and save the plan to ``out`` (if omitted, a new temporary folder that
    is removed when this Python process exits).

    stages: number of stages; with ``max_stage_memory`` alone, the fewest that fit; else the model's own
        ``pipeline_stage`` annotations, else 1.
    cuts: tensor names to cut after (each starts a new stage); overrides the automatic choice.
    max_stage_memory: weight bytes one stage may hold (``"2GB"`` or an int).
    profile: balance measured ONNX Runtime per-node times instead of analytic FLOPs.
    profile_feeds: the inputs to measure them on (default: random inputs sized by ``dims``).
    optimize: apply ONNX Runtime's extended fusions before cutting (writes an optimised copy with its weights).
    copy_weights: write a self-contained per-stage copy of the weights instead of linking the model's files.
    dims: sizes for symbolic dims in cost estimates (others count 1), e.g. ``{"seq": 128}``.
    example_inputs: inputs of the workload (name -> array): their sizes of the symbolic dims size the costs
        (``dims`` wins where both give one), and ``profile`` measures on them.
    workers: choose stages x replicas for this many workers (without ``stages``): the best predicted throughput
        under the memory cap; fewer stages when near-equal. The plan records the replicas (``plan.replicas``),
        which ``Pipeline(plan)`` runs unless told otherwise.
    tensor_parallel: split each stage's layers over this many rank workers (Megatron-style column/row splits);
        with ``max_stage_memory`` and no degree, the degree that fits in the fewest workers is chosen.
    hash_weights: record a sha256 of every weight byte (seconds per GB), for ``onnxshard verify --weights``;
        without it, weight files over 64 MiB get a sampled digest only (checked at every load).
    kv_pairs: a decoder's cache pairs, past input -> present output, where the names are not the usual
        ``past_key_values.{i}.key`` / ``present.{i}.key`` (found by name otherwise).
    """
    model = source = _model_path(model)
    if isinstance(max_stage_memory, str):
        try:
            max_stage_memory = parse_bytes(max_stage_memory)
        except ValueError as e:
            raise PlanError(str(e)) from None
    stages = _count(stages, "stages")
    tensor_parallel = _count(tensor_parallel, "tensor_parallel")
    workers = _count(workers, "workers")
    cuts = [cuts] if isinstance(cuts, str) else list(cuts)  # one name, not its characters
    dims = check_dims(dims)
    if example_inputs is not None:
        dims = {**example_dims(example_inputs, model), **(dims or {})}
        profile_feeds = profile_feeds if profile_feeds is not None else example_inputs
    if out is not None:
        partitioner.check_out(out, [model])  # before any work: never a user's folder, never after minutes
    out = Path(out) if out is not None else _temporary_folder() / "plan"
    # The optimised copy (with its weights) lives beside the plan until the plan has copied what it needs.
    scratch = tempfile.TemporaryDirectory(prefix="onnxshard-opt-", dir=_scratch_dir(out)) if optimize else nullcontext()
    with scratch as folder:
        if optimize:
            model = tools.optimize_model(model, Path(folder) / model.name)
        analysis = partitioner.analyse_model(model, dims=dims, type_oracle=tools.probe_types,
                                             allow_domains=allow_domains)
        node_times = None
        if profile:
            feeds = profile_feeds or tools.random_feeds(tuple(analysis.specs[i] for i in analysis.graph.inputs),
                                                        dims=dims)
            node_times = tools.profile_node_times(analysis.graph.model, analysis.graph.folder, feeds)
        result = partitioner.partition(analysis, out, stages=stages, cuts=cuts, max_stage_memory=max_stage_memory,
                                       node_times=node_times, copy_weights=copy_weights or optimize,
                                       source=source, tensor_parallel=tensor_parallel, hash_weights=hash_weights,
                                       kv_pairs=kv_pairs, workers=workers)
    return result


def example_dims(feeds, model: str | os.PathLike) -> dict[str, int]:
    """The sizes ``feeds`` give the model's symbolic input dims (checked like a run's inputs), the batch's left
    out: costs stay per sample."""
    from onnxshard.runtime.session import check_feeds, feed_dims

    if not isinstance(feeds, dict) or not all(isinstance(v, np.ndarray) for v in feeds.values()):
        raise InputError("example_inputs must be a dict of input name -> numpy array")
    specs = partitioner.input_specs(model)
    check_feeds(feeds, specs, where="example_inputs")
    return {d: n for d, n in feed_dims(feeds, specs).items() if not is_batch_name(d)}


def _model_path(model) -> Path:
    if not isinstance(model, (str, os.PathLike)):
        raise PlanError(f"model must be the path of an .onnx file, got {type(model).__name__}")
    path = Path(model)
    if path.is_dir():
        raise PlanError(f"model {path} is a folder; give the .onnx file inside it (a plan folder is run, not planned)")
    return path


def _count(value, name: str) -> int | None:
    """``value`` if it is a whole number of at least 1 (or None), else a PlanError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlanError(f"{name} must be a whole number of at least 1 (got {value!r})")
    return int(value)


def check_dims(dims) -> dict[str, int]:
    """Symbolic dim sizes as given by the user: names to whole numbers of at least 1."""
    if dims is None:
        return {}
    if not isinstance(dims, dict):
        raise PlanError(f"dims must map dim names to sizes, e.g. {{'seq': 128}} (got {type(dims).__name__})")
    for name, size in dims.items():
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise PlanError(f"dims[{name!r}] = {size!r}: a dim size must be a whole number of at least 1")
    return {name: int(size) for name, size in dims.items()}


def _temporary_folder() -> Path:
    """A new temporary folder, removed when this process exits (a plan made without ``out`` stays usable until
    then, and does not outlive it)."""
    folder = tempfile.mkdtemp(prefix="onnxshard-plan-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


def _scratch_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def load_plan(directory: str | os.PathLike) -> Plan:
    """Read and check a saved plan folder."""
    return Plan.load(directory)


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`: the max absolute difference per output against the unsplit model."""

    plan: Plan
    differences: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(d <= self.tolerance for d in self.differences.values())

    def report(self) -> str:
        lines = [f"{'output':<32} max |diff|"]
        lines += [f"{name:<32} {d:.3g}{'' if d <= self.tolerance else '  MISMATCH'}"
                  for name, d in self.differences.items()]
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.plan.num_stages} stage(s) vs the unsplit model (tolerance {self.tolerance:g})")
        return "\n".join(lines)


def verify(model_or_plan: str | os.PathLike | Plan, *, stages: int | None = None,
           feeds: dict[str, np.ndarray] | None = None, dims: dict[str, int] | None = None,
           tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, micro_batch_size: int | None = None,
           **plan_options) -> Verification:
    """Run the stages one after another in this process and compare each output with plain ONNX Runtime on the
    whole model. A model path is planned first with ``stages`` and ``plan_options``, into a temporary folder kept
    until this process exits (the result holds the plan).
    ``micro_batch_size``: cut the batch into micro-batches of this size along its batch axis and run both the
    stages and ORT per micro-batch, as a pipeline does (for a model whose samples depend on each other, the
    whole-batch result differs, and this is the check that holds)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise PlanError(f"tolerance must be a finite number of at least 0 (got {tolerance!r})")
    dims = check_dims(dims)
    if isinstance(model_or_plan, Plan):
        the_plan = model_or_plan
    elif is_plan_dir(model_or_plan):
        the_plan = Plan.load(model_or_plan)
    else:
        the_plan = plan(model_or_plan, stages=stages, dims=dims, **plan_options)  # removed at exit: the result
        return verify(the_plan, feeds=feeds, dims=dims, tolerance=tolerance, seed=seed,  # holds the plan
                      micro_batch_size=micro_batch_size)
    if not Path(the_plan.model).is_file():
        raise PlanError(f"the plan's source model {the_plan.model} is gone; verify needs it as the reference")
    feeds = feeds if feeds is not None else tools.random_feeds(the_plan.inputs, dims=dims, seed=seed)
    if micro_batch_size is not None:
        reference, got = _per_micro_batch(the_plan, feeds, _count(micro_batch_size, "micro_batch_size"))
    else:
        reference = tools.run_model(the_plan.model, feeds)
        got = tools.run_stages(the_plan, feeds)
    return Verification(the_plan, tools.max_differences(reference, got), tolerance)


def _per_micro_batch(the_plan: Plan, feeds: dict[str, np.ndarray], size: int):
    """ORT on the whole model and the stages in sequence, each run per micro-batch of ``size`` and put back
    together along the batch axes."""
    from onnxshard.distributed import microbatch

    axes = microbatch.infer_batch_axes(the_plan)
    if axes is None:
        raise PlanError("the batch axis of this model cannot be told, so it cannot be cut into micro-batches")
    whole, sessions = tools.model_runner(the_plan.model), tools.stage_sessions(the_plan)  # one session each
    return (microbatch.run_per_micro_batch(whole, feeds, axes, size),
            microbatch.run_per_micro_batch(lambda chunk: tools.run_stages(the_plan, chunk, sessions), feeds, axes, size))

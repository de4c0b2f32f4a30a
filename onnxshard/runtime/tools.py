"""In-process tools on ONNX Runtime: run a plan's stages one after another, make random feeds, type tensors
shape inference cannot, profile per-node times, and the optional ORT optimisation pre-pass."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxshard import dtypes
from onnxshard.errors import InputError, ModelError
from onnxshard.plans import NON_TENSOR, Plan, TensorSpec
from onnxshard.runtime.rank_shard import TensorParallelStage
from onnxshard.runtime.session import RuntimeConfig, ShardSession, check_feeds, open_session


def stage_sessions(plan: Plan, config: RuntimeConfig = RuntimeConfig()) -> list[ShardSession | TensorParallelStage]:
    """A session per stage (all ranks of a tensor-parallel stage, run one after another, in one object)."""
    return [TensorParallelStage(plan, s, config) if s.steps else
            ShardSession(plan.stage_path(s), s.inputs, s.outputs, config, plan.weights_dir(), label=f"stage {s.index}")
            for s in plan.stages]


def run_stages(plan: Plan, feeds: dict[str, np.ndarray], sessions: list | None = None,
               ) -> dict[str, np.ndarray]:
    """Run the stages in order in this process, each fed the tensors it names; returns the graph outputs."""
    check_feeds(feeds, plan.inputs, where="model")
    env = dict(feeds)
    for stage, session in zip(plan.stages, sessions or stage_sessions(plan)):
        env.update(session.run(env, stage=stage.index))
    return {t.name: env[t.name] for t in plan.outputs}


def run_model(model_path: str | os.PathLike, feeds: dict[str, np.ndarray],
              config: RuntimeConfig = RuntimeConfig()) -> dict[str, np.ndarray]:
    """The whole model in plain ONNX Runtime: the reference every split is compared against."""
    return model_runner(model_path, config)(feeds)


def model_runner(model_path: str | os.PathLike, config: RuntimeConfig = RuntimeConfig()):
    """One session on the whole model, as a function from feeds to named outputs (for many batches)."""
    session = open_session(model_path, config)
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(names, session.run(names, feeds)))
        except Exception as e:
            raise InputError(f"the unsplit model {model_path} itself fails on these inputs ({e}); give inputs it "
                             "accepts with --inputs FILE.npz, or sizes for its symbolic dims with --dim NAME=SIZE") from None

    return run


def random_feeds(specs: tuple[TensorSpec, ...], *, dims: dict[str, int] | None = None, default_dim: int = 2,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that fit ``specs``: symbolic dims from ``dims`` (else ``default_dim``), small ints, 0/1 bools."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds = {}
    for spec in specs:
        if spec.dtype == NON_TENSOR:
            raise InputError(f"input {spec.name!r} is a sequence, map or optional value: no random value is made for "
                             "it; give the feeds from Python (onnxshard.verify(plan, feeds=...))")
        if spec.shape is None:
            raise InputError(f"input {spec.name!r} has unknown rank; pass inputs with --inputs FILE.npz")
        shape = tuple(d if isinstance(d, int) and d > 0 else dims.get(d, default_dim) if isinstance(d, str)
                      else default_dim for d in spec.shape)
        feeds[spec.name] = random_array(spec.dtype, shape, rng)
    return feeds


def random_array(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype in ("float32", "float64", "float16"):
        return rng.standard_normal(shape).astype(dtypes.numpy_dtype(dtype))
    if dtype == "bfloat16":
        return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == "string":
        return np.array([f"s{v}" for v in rng.integers(0, 100, int(np.prod(shape)))], dtype=object).reshape(shape)
    return rng.integers(0, 4, shape).astype(dtypes.numpy_dtype(dtype))


def max_differences(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output, the largest absolute difference (``inf`` for a shape or dtype mismatch, 0 for equal strings)."""
    diffs = {}
    for name, ref in reference.items():
        value = got.get(name)
        if value is None or value.shape != ref.shape or value.dtype != ref.dtype:
            diffs[name] = float("inf")
        elif ref.dtype == object or ref.dtype == bool:
            diffs[name] = 0.0 if np.array_equal(ref, value) else float("inf")
        elif ref.size == 0:
            diffs[name] = 0.0
        else:
            a, b = ref.astype(np.float64), value.astype(np.float64)
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            diffs[name] = 0.0 if same.all() else float(np.max(np.abs(a - b)[~same]))
    return diffs


def probe_types(model: onnx.ModelProto, folder: Path, names: list[str]) -> dict[str, TensorSpec]:
    """Ask ONNX Runtime for the type and shape of tensors shape inference left untyped (custom ops, contrib ops),
    by loading the model with those tensors as extra outputs. Nothing is run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    config = RuntimeConfig(intra_op_threads=1, prepacking=False, optimization="none")
    try:
        session = open_session(probe.SerializeToString(), config, weights_dir=folder)
    except ModelError:
        return {}
    specs = {}
    for out in session.get_outputs():
        if out.name in names:
            try:
                dtype = dtypes.from_ort(out.type)
            except ValueError:
                dtype = NON_TENSOR
            # ORT reports an unknown shape as [], like a scalar's: treat [] as unknown.
            shape = tuple(out.shape) if out.shape else None
            specs[out.name] = TensorSpec(out.name, dtype, shape)
    return specs


def profile_node_times(model: onnx.ModelProto, folder: Path, feeds: dict[str, np.ndarray], *,
                       runs: int = 5, threads: int = 1) -> dict[str, float]:
    """Median measured seconds per node, from ORT's profiler with graph optimisations off (so names match)."""
    config = RuntimeConfig(intra_op_threads=threads, optimization="none")
    so = config.session_options()
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(folder))
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model.SerializeToString(), so, providers=config.providers())
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            node = ev["args"].get("node_name") or ev["name"][: -len("_kernel_time")]
            times.setdefault(node, []).append(ev["dur"] * 1e-6)
    return {k: float(np.median(v[1:] if len(v) > 1 else v)) for k, v in times.items()}


def optimize_model(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """ORT's extended optimisations (fusions) applied before cutting, so cuts do not break them. Weights of the
    optimised model go to one external file beside ``out_path``."""
    out_path = Path(out_path)
    so = RuntimeConfig(optimization="extended").session_options()
    so.optimized_model_filepath = str(out_path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out_path.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"ONNX Runtime could not optimise {model_path}: {e}") from e
    return out_path

"""One ONNX Runtime session per shard, with its inputs checked before ORT sees them."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxshard import dtypes
from onnxshard.errors import InputError, ModelError, ResourceError, WorkerError
from onnxshard.plans import NON_TENSOR, TensorSpec

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# What ONNX Runtime says when memory or a device gives out (the CPU arena, std::bad_alloc, CUDA/cuBLAS/cuDNN
# allocation and device errors): a resource failure, not a fault in the data.
RESOURCE_FAILURE = re.compile(r"bad_alloc|failed to allocate|out of memory|alloc_failed|CUDA failure|CUDA error|"
                              r"cudaError|CUBLAS_STATUS|CUDNN_STATUS|device lost|MemoryError", re.IGNORECASE)


@dataclass(frozen=True)
class RuntimeConfig:
    """How a shard's ONNX Runtime session is made.

    intra_op_threads: threads for one operator (0 lets ORT choose; workers pass their CPU count).
    provider: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when a GPU is visible and the CUDA provider is installed).
    device_id: the GPU for CUDA.
    prepacking: ORT copies MatMul weights into anonymous memory in a faster layout. Off keeps weights memory-mapped
        and shared between processes at some speed cost.
    optimization: ``"all"``, ``"extended"``, ``"basic"`` or ``"none"``.
    turns: the session takes turns on its node's CPUs with other sessions (a generator's stages on one node): its
        threads stop spinning as each run ends, and a worker runs no more of them than its machine has cores.
    """

    intra_op_threads: int = 0
    provider: str = "auto"
    device_id: int = 0
    prepacking: bool = True
    optimization: str = "all"
    turns: bool = False

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.optimization]
        if not self.prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if self.intra_op_threads == 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif self.turns:  # spin while a run lasts, not into the next stage's turn
            so.add_session_config_entry("session.force_spinning_stop", "1")
        return so

    def providers(self) -> list:
        available = ort.get_available_providers()
        want_cuda = self.provider == "cuda" or (self.provider == "auto" and "CUDAExecutionProvider" in available)
        if want_cuda:
            if "CUDAExecutionProvider" not in available:
                raise ModelError("provider 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider; "
                                 "install onnxruntime-gpu or use provider='cpu'")
            return [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]


def open_session(model: str | os.PathLike | bytes, config: RuntimeConfig = RuntimeConfig(),
                 weights_dir: str | os.PathLike | None = None, *, shared_arena: bool = False) -> ort.InferenceSession:
    """An ORT session for a model file, or for model bytes whose external data lives in ``weights_dir``.
    ``shared_arena``: use one CPU memory arena for every such session of the process (a tensor-parallel rank
    has a session per step; separate arenas would each keep their peak activations)."""
    so = config.session_options()
    if shared_arena and _register_shared_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    if weights_dir is not None:
        so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(weights_dir))
        if not isinstance(model, bytes):
            model = Path(model).read_bytes()
    target = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(target, so, providers=config.providers())
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise ModelError(f"ONNX Runtime cannot load {where}: {e}") from e


@functools.cache
def _register_shared_arena() -> bool:
    """Register one arena allocator for CPU memory with ORT's environment, once per process."""
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        return True
    except Exception:  # an ORT build without the API: each session keeps its own arena
        return False


class ShardSession:
    """An ORT session for one shard that checks feeds against the shard's declared inputs."""

    def __init__(self, path: str | os.PathLike, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 config: RuntimeConfig = RuntimeConfig(), weights_dir: str | os.PathLike | None = None,
                 label: str = "shard", shared_arena: bool = False):
        self.label = label
        self.inputs = inputs
        self.outputs = outputs
        self.output_names = [t.name for t in outputs]
        self.session = open_session(path, config, weights_dir, shared_arena=shared_arena)
        self.providers = self.session.get_providers()

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise :class:`InputError` naming the tensor unless ``feeds`` fit the declared inputs."""
        check_feeds(feeds, self.inputs, where=self.label, extra_ok=True)

    def run(self, feeds: dict[str, np.ndarray], *, micro_batch: int | None = None,
            stage: int | None = None) -> dict[str, np.ndarray]:
        self.check(feeds)
        args = {t.name: feeds[t.name] for t in self.inputs}
        try:
            values = self.session.run(self.output_names, args)
        except Exception as e:
            mb = f", micro-batch {micro_batch}" if micro_batch is not None else ""
            if RESOURCE_FAILURE.search(str(e)):
                raise ResourceError(f"{self.label}{mb}: out of memory or device failure in ONNX Runtime: "
                                    f"{_first_line(e)}", stage=stage, micro_batch=micro_batch) from None
            raise WorkerError(f"{self.label}{mb}: ONNX Runtime failed: {e}", stage=stage,
                              micro_batch=micro_batch) from None
        return dict(zip(self.output_names, values))


def check_feeds(feeds: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], *, where: str,
                extra_ok: bool = False) -> None:
    names = {t.name for t in specs}
    missing = [t.name for t in specs if t.name not in feeds]
    if missing:
        raise InputError(f"{where}: missing input(s) {missing}; it takes {sorted(names)}")
    extra = [k for k in feeds if k not in names]
    if extra and not extra_ok:
        raise InputError(f"{where}: unknown input(s) {extra}; it takes {sorted(names)}")
    for spec in specs:
        check_array(feeds[spec.name], spec, where=where)
    check_symbolic_dims(feeds, specs, where=where)


def feed_dims(feeds: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> dict[str, int]:
    """The size each symbolic dim of ``specs`` has in ``feeds`` (``{"batch": 16, "seq": 128}``)."""
    return {dim: feeds[spec.name].shape[axis] for spec in specs if spec.name in feeds
            for axis, dim in enumerate(spec.shape or ()) if isinstance(dim, str)}


def check_symbolic_dims(feeds: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], *, where: str) -> None:
    """Inputs that share a symbolic dim (``batch``, ``seq``) must agree on its size."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape or ()):
            if not isinstance(dim, str):
                continue
            size = feeds[spec.name].shape[axis]
            first = seen.setdefault(dim, (spec.name, size))
            if first[1] != size:
                raise InputError(f"{where}: inputs disagree on dim {dim!r}: {first[0]!r} has {first[1]}, "
                                 f"{spec.name!r} has {size} (axis {axis}); give them the same size")


def check_array(value, spec: TensorSpec, *, where: str) -> None:
    if spec.dtype == NON_TENSOR:  # a sequence or optional: ONNX Runtime checks it
        return
    if not isinstance(value, np.ndarray):
        raise InputError(f"{where}: input {spec.name!r} must be a numpy array, got {type(value).__name__}")
    try:
        got = dtypes.from_numpy(value.dtype)
    except ValueError:
        raise InputError(f"{where}: input {spec.name!r} has dtype {value.dtype}, which no ONNX type matches; "
                         f"it takes {spec.dtype}") from None
    if got != spec.dtype and not (spec.dtype == "bfloat16" and value.dtype == np.uint16):
        raise InputError(f"{where}: input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype}; "
                         "convert it with .astype")
    if value.dtype == object and spec.dtype == "string" and value.size and \
            not all(isinstance(v, str) for v in value.flat):
        raise InputError(f"{where}: input {spec.name!r} is an object array holding non-strings; "
                         "only string tensors may be object arrays")
    if spec.shape is None:
        return
    if value.ndim != len(spec.shape):
        raise InputError(f"{where}: input {spec.name!r} has rank {value.ndim} (shape {value.shape}), expected rank "
                         f"{len(spec.shape)} ({_shape_text(spec.shape)})")
    for axis, (have, want) in enumerate(zip(value.shape, spec.shape)):
        if isinstance(want, int) and want > 0 and have != want:
            raise InputError(f"{where}: input {spec.name!r} has {have} on axis {axis} (shape {value.shape}), "
                             f"expected {want} ({_shape_text(spec.shape)})")


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

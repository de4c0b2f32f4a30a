"""onnxshard: run ONNX models too big or too slow for one worker as pipelined, sharded stages on Ray."""

from onnxshard.errors import (
    ClusterError,
    InputError,
    ModelError,
    OnnxShardError,
    OverloadedError,
    PlanError,
    ResourceError,
    WorkerError,
)
from onnxshard.plans import Plan, Stage, TensorSpec
from onnxshard.runtime import RuntimeConfig
from onnxshard.sampling import SamplingParams

__all__ = [
    "ClusterError", "Generator", "InputError", "ModelError", "OnnxShardError", "OverloadedError", "Pipeline",
    "PipelineConfig", "Plan", "PlanError", "ResourceError", "RunStats", "RuntimeConfig", "SamplingParams", "Stage",
    "TensorSpec", "Verification", "WorkerError", "load_plan", "plan", "verify",
]

_DISTRIBUTED = {"Generator", "Pipeline", "PipelineConfig", "RunStats"}
_API = {"Verification", "load_plan", "plan", "verify"}


def __getattr__(name: str):
    # Imported when first used: Ray only with the pipeline, so planning stays light; the partitioner (and onnx)
    # only with planning, so a stage worker, which imports this package, starts without them.
    if name in _DISTRIBUTED:
        from onnxshard import distributed

        return getattr(distributed, name)
    if name in _API:
        from onnxshard import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxshard' has no attribute {name!r}")

"""onnxshard: run ONNX models too big or too slow for one worker as pipelined, sharded stages on Ray."""

from onnxshard.api import Verification, load_plan, plan, verify
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


def __getattr__(name: str):
    # Ray is imported only when the pipeline is used, so planning stays light.
    if name in _DISTRIBUTED:
        from onnxshard import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'onnxshard' has no attribute {name!r}")

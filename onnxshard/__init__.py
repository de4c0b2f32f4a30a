"""onnxshard: run ONNX models too big or too slow for one worker as pipelined, sharded stages on Ray."""

from onnxshard.api import Verification, load_plan, plan, verify
from onnxshard.errors import InputError, ModelError, OnnxShardError, PlanError, WorkerError
from onnxshard.plan import Plan, Stage, TensorSpec

__all__ = [
    "InputError", "ModelError", "OnnxShardError", "Plan", "PlanError", "Stage", "TensorSpec", "Verification",
    "WorkerError", "load_plan", "plan", "verify",
]

"""The coordinator: placement, micro-batch scheduling, replicas."""

from onnxshard.distributed.pipeline import Pipeline, PipelineConfig
from onnxshard.distributed.stats import RunStats, StageStats

__all__ = ["Pipeline", "PipelineConfig", "RunStats", "StageStats"]

"""Ray actors that hold one shard each."""

from onnxshard.workers.stage_worker import CallStats, Failure, StageWorker

__all__ = ["CallStats", "Failure", "StageWorker"]

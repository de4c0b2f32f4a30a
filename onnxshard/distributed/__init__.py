"""The coordinator: placement, micro-batch scheduling, replicas. Ray is imported only when the pipeline is used,
so the pure modules here (``microbatch``, ``sizing``, ``requests``, ``limits``) stay light."""

__all__ = ["Generator", "Pipeline", "PipelineConfig", "RunStats", "SamplingParams", "StageStats"]


def __getattr__(name: str):
    if name in ("Pipeline", "PipelineConfig"):
        from onnxshard.distributed import pipeline

        return getattr(pipeline, name)
    if name == "Generator":
        from onnxshard.distributed import generator

        return generator.Generator
    if name == "SamplingParams":
        from onnxshard import sampling

        return sampling.SamplingParams
    if name in ("RunStats", "StageStats"):
        from onnxshard.distributed import stats

        return getattr(stats, name)
    raise AttributeError(f"module 'onnxshard.distributed' has no attribute {name!r}")

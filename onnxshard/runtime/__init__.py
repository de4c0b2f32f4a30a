"""ONNX Runtime sessions for shards, the Arrow tensor codec, and in-process tools (verify, profile). No Ray."""

from onnxshard.runtime.session import RuntimeConfig, ShardSession, open_session

__all__ = ["RuntimeConfig", "ShardSession", "open_session"]

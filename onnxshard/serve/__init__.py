"""Serving split models on Ray Serve under the KServe v2 / Open Inference Protocol (HTTP and gRPC).

``build_app`` is a Serve application builder: ``serve run onnxshard.serve:build_app plan_dir=plan/``;
``onnxshard serve`` starts Serve and runs it (``server.py``). Ray Serve is imported only when used."""

__all__ = ["GRPC_SERVICER", "ServeArgs", "build_app"]


def __getattr__(name: str):
    if name in __all__:
        from onnxshard.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'onnxshard.serve' has no attribute {name!r}")

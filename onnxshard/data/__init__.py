"""Cluster batch inference on Ray Data (Parquet in, Parquet out): ``predict(ds, plan)`` and the ``Predictor``
class for ``ds.map_batches``. Ray is imported only when used."""

__all__ = ["Predictor", "predict"]


def __getattr__(name: str):
    if name in __all__:
        from onnxshard.data import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'onnxshard.data' has no attribute {name!r}")

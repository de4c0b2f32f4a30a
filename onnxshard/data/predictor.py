"""Batch inference on Ray Data: :class:`Predictor` is a callable class for ``ds.map_batches``; each actor of the
pool owns one pipeline (its stage workers in a placement group of their own), as ``ray.data.llm`` runs a
multi-worker engine inside each actor. :func:`predict` wires it up."""

from __future__ import annotations

import os

import numpy as np

from onnxshard.data.columns import column_map, row_outputs, to_columns, to_feeds


class Predictor:
    """``ds.map_batches(Predictor, fn_constructor_kwargs={"plan": "plan/"}, batch_format="numpy",
    compute=ray.data.ActorPoolStrategy(size=R))``. ``columns``: model input -> column, where the names differ;
    ``keep``: input columns copied beside the outputs (an id to join on); ``outputs``: the model outputs to write
    (default: every output with one row per input row; an output without a batch axis cannot be a column);
    ``options``: the pipeline's (``micro_batch_size``, ``cpus_per_stage``, ``gpus_per_stage``, ...)."""

    def __init__(self, plan: str | os.PathLike, *, columns: dict[str, str] | None = None, keep: tuple[str, ...] = (),
                 outputs: tuple[str, ...] | None = None, stages: int | None = None, **options):
        from onnxshard.distributed import Pipeline

        self.pipe = Pipeline(plan, stages=stages, **options)
        self.mapping = column_map(self.pipe.plan.inputs, columns)
        self.keep = tuple(keep)
        self.outputs = row_outputs(self.pipe.plan.inputs, self.pipe.plan.outputs, outputs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        where = f"a batch of {len(next(iter(batch.values()), ()))} rows"
        feeds = to_feeds(batch, self.pipe.plan.inputs, self.mapping, where, self.keep)
        outputs = self.pipe.run(feeds)
        return to_columns({name: outputs[name] for name in self.outputs}, batch, self.keep, where)

    def __del__(self):
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


def predict(ds, plan: str | os.PathLike, *, replicas: int = 1, batch_size: int = 256,
            columns: dict[str, str] | None = None, keep: tuple[str, ...] = (), outputs: tuple[str, ...] | None = None,
            **options):
    """``ds`` with the model's outputs as columns (beside the ``keep`` columns), computed by ``replicas`` pool
    actors that each own a pipeline of ``plan``. Lazy, as Ray Data is: write or iterate the result to run it."""
    import ray.data

    return ds.map_batches(Predictor, fn_constructor_kwargs=dict(plan=str(plan), columns=columns, keep=tuple(keep),
                                                                outputs=outputs, **options),
                          batch_size=batch_size, batch_format="numpy", num_cpus=0,
                          compute=ray.data.ActorPoolStrategy(size=replicas))

"""Batch inference on Ray Data: :class:`Predictor` is a callable class for ``ds.map_batches``; each actor of the
pool owns one pipeline (its stage workers in a placement group of their own), as ``ray.data.llm`` runs a
multi-worker engine inside each actor. :func:`predict` wires it up."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from onnxshard import dtypes
from onnxshard.data import provenance
from onnxshard.data.columns import column_map, good_rows, keep_label, row_outputs, to_columns, to_feeds
from onnxshard.errors import InputError, RowError
from onnxshard.memory import private_bytes

ERROR = "_onnxshard_error"  # with on_error="skip": why the row was rejected ("" for a good row)
ROW = "_onnxshard_row"  # with on_error="skip": a rejected row's place in its input file (-1 when unknown)


class Predictor:
    """``ds.map_batches(Predictor, fn_constructor_kwargs={"plan": "plan/"}, batch_format="numpy",
    compute=ray.data.ActorPoolStrategy(size=R))``. ``columns``: model input -> column, where the names differ;
    ``keep``: input columns copied beside the outputs (an id to join on); ``outputs``: the model outputs to write
    (default: every output with one row per input row; an output without a batch axis cannot be a column);
    ``on_error``: ``"raise"`` fails the job on a bad row, naming it (its file and place in the file when the data
    was read with ``include_paths=True, include_row_hash=True``); ``"skip"`` keeps going and marks each bad row in
    the column ``_onnxshard_error`` (its outputs are zeros), with its place in its file in ``_onnxshard_row``;
    ``stats``: an actor handle told, as batches finish, ``add(actor id, report)``: each stage's busy seconds so far,
    this actor's lifetime since its pipeline started (``wall``; ``start_s`` to start it, from ``began``), pid and
    peak anonymous RSS, its stage workers' pids and peak (those on this node) and the
    workers its pipeline replaced;
    ``options``: the pipeline's (``micro_batch_size``, ``cpus_per_stage``, ``gpus_per_stage``, ...)."""

    def __init__(self, plan: str | os.PathLike, *, columns: dict[str, str] | None = None, keep: tuple[str, ...] = (),
                 outputs: tuple[str, ...] | None = None, stages: int | None = None, on_error: str = "raise",
                 stats=None, **options):
        from onnxshard.distributed import Pipeline

        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
        began = time.time()
        # a model file is planned now (not at the first batch): its inputs map the columns
        self.pipe = Pipeline(plan, stages=stages, **options).start()
        self.start_s = time.time() - began
        self.mapping = column_map(self.pipe.plan.inputs, columns)
        self.keep = tuple(keep)
        self.named_by = tuple(k for k in self.keep if k != provenance.PATH)  # the columns a message names a row by
        self.outputs = row_outputs(self.pipe.plan.inputs, self.pipe.plan.outputs, outputs)
        self.on_error = on_error
        self.stats, self.started = stats, time.time()
        self.peaks = [0, 0]  # anonymous RSS seen at the end of a batch: this actor's, its stage workers' largest
        self.skipping = threading.Lock()
        self.row_shapes: dict[str, tuple] = {}  # each output's row shape, for the zeros of rejected rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()), ()))
        where = f"a batch of {n} rows"

        def name(i):
            return provenance.name_row(batch, i, keep_label(batch, self.named_by, i))

        if self.on_error == "raise":
            try:
                feeds = to_feeds(batch, self.pipe.plan.inputs, self.mapping, where, self.keep, name)
            except RowError:
                raise
            except InputError as e:  # the whole batch is at fault (no good row in it): its first row names the file
                raise InputError(f"{name(0)}: {e}") from None
            outputs = self._run(feeds)
            return to_columns({k: outputs[k] for k in self.outputs}, batch, self.keep, where)
        good, feeds, reasons = good_rows(batch, self.pipe.plan.inputs, self.mapping, where, self.keep, name)
        outputs = {}
        if feeds is not None:
            outputs, failed = self._run_skipping(feeds)
            for i, message in failed.items():
                reasons[int(good[i])] = f"{where}: {name(int(good[i]))}: {message}"
            good = np.delete(good, list(failed))
        columns = to_columns(self._with_zeros(outputs, good, n), batch, self.keep, where)
        columns[ERROR] = np.array([reasons.get(i, "") for i in range(n)], dtype=object)
        places = provenance.rows_in_files(batch, reasons)
        columns[ROW] = np.array([places.get(i, -1) for i in range(n)], dtype=np.int64)
        return columns

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.pipe.run(feeds)
        self._count()
        return outputs

    def _run_skipping(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """The outputs of the rows ONNX Runtime takes, and the message for each row it raised on: the batch
        first, then, if it fails on its data, row by row."""
        with self.skipping:  # pipe.skipped is the pipeline's: one such call at a time
            self.pipe.skipped.clear()
            done = list(self.pipe.stream([feeds], on_error="skip"))
            self._count()
            if done:
                return done[0], {}
            n = len(next(iter(feeds.values())))
            self.pipe.skipped.clear()
            rows = list(self.pipe.stream(({k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)),
                                         on_error="skip"))
            failed = {s.request: s.message for s in self.pipe.skipped}
            self.pipe.skipped.clear()
            self._count()
        outputs = {k: np.concatenate([r[k] for r in rows]) for k in self.outputs} if rows else {}
        return outputs, failed

    def _with_zeros(self, outputs: dict[str, np.ndarray], good: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """Each output column for all ``n`` rows: the outputs at the good rows, zeros elsewhere (of the row shape
        seen last, else the plan's with unknown dims as 1)."""
        specs = {t.name: t for t in self.pipe.plan.outputs}
        full = {}
        for name in self.outputs:
            if name in outputs:
                self.row_shapes[name] = outputs[name].shape[1:]
                dtype = outputs[name].dtype
            else:
                dtype = dtypes.numpy_dtype(specs[name].dtype)
            shape = self.row_shapes.get(name) or tuple(d if isinstance(d, int) else 1
                                                       for d in (specs[name].shape or ("batch",))[1:])
            column = np.zeros((n, *shape), dtype)
            if name in outputs:
                column[good] = outputs[name]
            full[name] = column
        return full

    def _count(self) -> None:
        """Tell the ``stats`` actor this actor's totals so far."""
        if self.stats is None:
            return
        import ray

        workers = [w.get("pid") for replica in self.pipe.worker_info for stage in replica for w in stage]
        self.peaks = [max(self.peaks[0], private_bytes()),
                      max(self.peaks[1], max((private_bytes(pid) for pid in workers if pid), default=0))]
        key = ray.get_runtime_context().get_actor_id() or str(os.getpid())
        self.stats.add.remote(key, {
            "busy": list(self.pipe.busy_s), "wall": time.time() - self.started, "start_s": self.start_s,
            "began": self.started - self.start_s, "pid": os.getpid(),
            "workers": workers, "peak_memory": self.peaks[0], "worker_peak_memory": self.peaks[1],
            "recoveries": len(self.pipe.recoveries)})

    def __del__(self):
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


def predict(ds, plan: str | os.PathLike, *, replicas: int = 1, batch_size: int = 256,
            columns: dict[str, str] | None = None, keep: tuple[str, ...] = (), outputs: tuple[str, ...] | None = None,
            on_error: str = "raise", calls_per_actor: int = 2, **options):
    """``ds`` with the model's outputs as columns (beside the ``keep`` columns), computed by ``replicas`` pool
    actors that each own a pipeline of ``plan``. Lazy, as Ray Data is: write or iterate the result to run it.
    ``calls_per_actor``: batches each actor takes at once; with 2 the next batch enters the pipeline while the
    last one drains, so the stages are not left idle between batches (0.91x against 0.78x of the baseline's rows/s
    in benchmarks/batch.py) at the cost of more blocks held by the actor. See :class:`Predictor` for the rest."""
    import ray.data

    return ds.map_batches(Predictor, fn_constructor_kwargs=dict(plan=str(plan), columns=columns, keep=tuple(keep),
                                                                outputs=outputs, on_error=on_error, **options),
                          batch_size=batch_size, batch_format="numpy", num_cpus=0,
                          compute=ray.data.ActorPoolStrategy(size=replicas, max_concurrent_calls_per_actor=calls_per_actor,
                                                             enable_true_multi_threading=calls_per_actor > 1))

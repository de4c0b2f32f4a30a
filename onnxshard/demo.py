"""`onnxshard demo`: the main job on a fresh machine, end to end on a local embedded Ray."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from onnxshard import models
from onnxshard.api import plan
from onnxshard.runtime import RuntimeConfig, tools


def run_demo(*, stages: int = 2, batch: int = 32, seq: int = 64, layers: int = 6, micro_batch_size: int = 4,
             address: str | None = None, repeats: int = 3) -> int:
    from onnxshard.distributed import Pipeline

    with tempfile.TemporaryDirectory(prefix="onnxshard-demo-") as tmp:
        tmp = Path(tmp)
        model = models.save(models.transformer(layers=layers, d=256, heads=4, ffn=1024, vocab=1000), tmp / "model",
                            external=True)
        print(f"built a {layers}-layer transformer (d=256, vocab 1000) at {model}")
        the_plan = plan(model, tmp / "plan", stages=stages, dims={"seq": seq})
        print(the_plan.table())
        feeds = tools.random_feeds(the_plan.inputs, dims={"batch": batch, "seq": seq}, seed=1)
        feeds["mask"] = np.ones_like(feeds["mask"])
        feeds["ids"] = np.random.default_rng(2).integers(0, 1000, feeds["ids"].shape)

        reference, ort_s = _timed(lambda: tools.run_model(model, feeds, RuntimeConfig(intra_op_threads=stages)),
                                  repeats)
        print(f"\nplain ONNX Runtime, whole model, {stages} threads: {batch / ort_s:.1f} samples/s")
        with Pipeline(the_plan, micro_batch_size=micro_batch_size, address=address) as pipe:
            outputs, pipe_s = _timed(lambda: pipe.run(feeds), repeats)
            print(f"onnxshard pipeline, {stages} stages x 1 thread, micro-batch {micro_batch_size}: "
                  f"{batch / pipe_s:.1f} samples/s ({ort_s / pipe_s:.2f}x plain ORT)")
            print(pipe.stats.table())
        diffs = tools.max_differences(reference, outputs)
        ok = all(d <= 1e-5 for d in diffs.values())
        print(f"max |pipeline - ORT| per output: {diffs} -> {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1


def _timed(fn, repeats):
    """The result and the median seconds of ``repeats`` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, float(np.median(times))

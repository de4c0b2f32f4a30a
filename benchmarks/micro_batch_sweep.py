"""Pipeline throughput against the micro-batch size, with ``micro_batch_size="auto"`` beside the fixed sizes.

    .venv/bin/python benchmarks/micro_batch_sweep.py [--model transformer|lstm] [--stages 2] [--batch 16]

Builds the model in code (the 6-layer d=256 transformer of pipeline_vs_ort.py at seq 128, or the 4-layer LSTM of
small_requests.py at seq 32), plans it, and times one batch through the pipeline (medians of ``--repeats`` after a
warm-up) for each size, in one Ray session. For "auto" it also prints the size chosen.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import ray

import onnxshard
from onnxshard import models
from onnxshard.bench import start_local_ray, table, timed
from onnxshard.distributed import Pipeline
from onnxshard.runtime import RuntimeConfig, open_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("transformer", "lstm"), default="transformer")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    if args.model == "transformer":
        model = models.transformer(layers=6, d=256, heads=4, ffn=1024)
        feeds = {"x": rng.standard_normal((args.batch, 128, 256)).astype(np.float32),
                 "mask": np.ones((args.batch, 128), np.float32)}
    else:
        model = models.lstm(layers=4, inputs=64, hidden=256)
        feeds = {"x": rng.standard_normal((32, args.batch, 64)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = models.save(model, Path(tmp) / "model", external=True)
        plan = onnxshard.plan(path, Path(tmp) / "plan", stages=args.stages)
        baseline = timed("ORT whole model, 2 threads", lambda s=open_session(path, RuntimeConfig(intra_op_threads=2)):
                         s.run(None, feeds), args.batch, args.repeats)
        start_local_ray(args.stages)
        rows = [baseline]
        sizes = [s for s in (1, 2, 4, 8, 16, 32) if s <= args.batch] + ["auto"]
        with Pipeline(plan, cpus_per_stage=1) as pipe:
            chosen = []

            def run(size):
                if size == "auto":
                    chosen.append(pipe.auto_micro_batch_size(args.batch))
                pipe.run(feeds, micro_batch_size=size)

            for size in sizes:
                rows.append(timed(f"{args.stages} stages, micro-batch {size}", lambda size=size: run(size),
                                  args.batch, args.repeats))
        ray.shutdown()
    print(f"{args.model}, batch {args.batch}, {args.stages} stages x 1 thread; auto chose micro-batch {chosen} "
          "(warm-up, then the timed runs)")
    print(table(rows, [baseline]))


if __name__ == "__main__":
    main()

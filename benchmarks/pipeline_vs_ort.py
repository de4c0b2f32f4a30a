"""Throughput of an onnxshard pipeline against plain ONNX Runtime on the same model and inputs, in one run.

    .venv/bin/python benchmarks/pipeline_vs_ort.py --layers 12 --d 768 --heads 12 --ffn 3072 --batch 16 --seq 128

Prints medians of ``--repeats`` timed runs (after one warm-up) and ratios against baselines measured here:
ORT on the whole model with 1 thread and with as many threads as the pipeline has stages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxshard
from onnxshard import models
from onnxshard.runtime import RuntimeConfig, open_session


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.stages, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        model = models.save(models.transformer(layers=args.layers, d=args.d, heads=args.heads, ffn=args.ffn),
                            Path(tmp) / "model", external=True)
        plan = onnxshard.plan(model, Path(tmp) / "plan", stages=args.stages, dims={"seq": args.seq})
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal((args.batch, args.seq, args.d)).astype(np.float32),
                 "mask": np.ones((args.batch, args.seq), np.float32)}
        rows = []
        for threads in sorted({1, args.stages}):
            session = open_session(model, RuntimeConfig(intra_op_threads=threads))
            med, times = timed(lambda s=session: s.run(None, feeds), args.repeats)
            rows.append((f"ORT whole model, {threads} thread(s)", med, times))
        with onnxshard.Pipeline(plan, micro_batch_size=args.micro_batch_size, cpus_per_stage=1) as pipe:
            med, times = timed(lambda: pipe.run(feeds), args.repeats)
            rows.append((f"onnxshard {args.stages} stages x 1 thread, micro-batch {args.micro_batch_size}", med, times))
            stats = pipe.stats
        best_ort = rows[-2][1]
        print(f"transformer {args.layers}x d={args.d} ffn={args.ffn}, batch {args.batch} x seq {args.seq}; "
              f"medians of {args.repeats}")
        print(f"{'':<52} {'samples/s':>10} {'spread':>16} {'vs ' + str(args.stages) + '-thread ORT':>16}")
        for name, med, times in rows:
            spread = f"{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} ms"
            print(f"{name:<52} {args.batch / med:>10.1f} {spread:>16} {best_ort / med:>15.2f}x")
        print(stats.table())
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Tensor parallelism on this machine: T=2 against T=1 (and a 2-stage pipeline), throughput and per-worker memory.

    .venv/bin/python benchmarks/tensor_parallel.py [--layers 4] [--d 512] [--batch 8] [--seq 64] [--repeats 5]
        [--micro-batch-size N]

Builds a LLaMA-style decoder (GQA, SwiGLU) in code, plans it as 1 stage x T=1, 1 stage x T=2 and 2 stages x T=1,
runs each on a local Ray with 1 CPU per worker, and reports median throughput (ratios against ORT on the whole
model with 1 and 2 threads, measured in the same run) and each worker's weight bytes and anonymous RSS.
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
from onnxshard.memory import proc_status_bytes
from onnxshard.runtime import RuntimeConfig, open_session
from onnxshard.units import human_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, help="default: batch / 4")
    p.add_argument("--inline-bytes", type=int, default=4 << 20, help="Ray's max_direct_call_object_size (default: "
                   "onnxshard's 4 MiB; Ray's own default is 100 KB)")
    args = p.parse_args()
    model = models.llama(layers=args.layers, d=args.d, heads=8, kv_heads=4, ffn=4 * args.d)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((args.batch, args.seq, args.d)).astype(np.float32),
             "mask": np.ones((args.batch, args.seq), np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = models.save(model, Path(tmp) / "model", external=True)
        plans = {"1 stage x T=1": onnxshard.plan(path, Path(tmp) / "t1", stages=1),
                 "1 stage x T=2": onnxshard.plan(path, Path(tmp) / "t2", stages=1, tensor_parallel=2),
                 "2 stages x T=1": onnxshard.plan(path, Path(tmp) / "s2", stages=2)}
        total = plans["1 stage x T=1"].stages[0].param_bytes
        print(f"LLaMA-style decoder: {args.layers} layers, d={args.d}, 8 heads / 4 KV heads, "
              f"{human_bytes(total)} of weights; batch {args.batch} x {args.seq}")
        baselines = []
        for threads in (1, 2):
            session = open_session(path, RuntimeConfig(intra_op_threads=threads))
            baselines.append(timed(f"ORT whole model, {threads} thread(s)", lambda s=session: s.run(None, feeds),
                                   args.batch, args.repeats))
        rows, memory = list(baselines), []
        start_local_ray(2, {"max_direct_call_object_size": args.inline_bytes})
        for name, plan in plans.items():
            with Pipeline(plan, micro_batch_size=args.micro_batch_size or max(1, args.batch // 4)) as pipe:
                rows.append(timed(f"pipeline {name}", lambda pipe=pipe: pipe.run(feeds), args.batch, args.repeats))
                reduce_s = sum(s.reduce_s for s in pipe.stats.stages)
                busy_s = sum(s.busy_s for s in pipe.stats.stages)
                for stage, ranks in zip(plan.stages, pipe.worker_info[0]):
                    for rank, info in enumerate(ranks):
                        held = stage.rank_param_bytes[rank] if stage.rank_param_bytes else stage.param_bytes
                        memory.append((name, stage.index, rank, held, proc_status_bytes(info["pid"], "RssAnon")))
                print(f"{name}: last run {pipe.stats.wall_s * 1e3:.1f} ms, reduces {reduce_s * 1e3:.1f} ms of "
                      f"{busy_s * 1e3:.1f} ms busy")
        ray.shutdown()
    print(table(rows, baselines))
    print(f"\n{'plan':<16} {'stage':>5} {'rank':>4} {'weights':>10} {'of model':>9} {'anon RSS':>10}")
    for name, stage, rank, held, anon in memory:
        print(f"{name:<16} {stage:>5} {rank:>4} {human_bytes(held):>10} {held / total:>8.1%} {human_bytes(anon):>10}")


if __name__ == "__main__":
    main()

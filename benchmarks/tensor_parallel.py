"""Tensor parallelism on this machine: T=2 against T=1 (and a 2-stage pipeline), throughput and per-worker memory.

    .venv/bin/python benchmarks/tensor_parallel.py [--model llama|bert] [--layers 4] [--d 512] [--batch 8]
        [--seq 64] [--repeats 5] [--micro-batch-size N] [--transports direct,ray]

Builds a LLaMA-style decoder (GQA, SwiGLU) or a BERT-style encoder (``--model bert``; BERT-base is ``--layers 12
--d 768 --batch 16 --seq 128``) in code, plans it as 1 stage x T=1 (one worker with 2 CPUs), 1 stage x T=2 (a
worker with 1 CPU per rank) and 2 stages x T=1, runs each on a local Ray, and reports median throughput (ratios
against ORT on the whole model with 1 and 2 threads, measured in the same run) and each worker's weight bytes and
anonymous RSS. T=2 runs once per transport: ``direct`` (the ranks reduce over their socket mesh) and ``ray``
(through the object store, a call per rank and step).
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
    p.add_argument("--model", choices=["llama", "bert"], default="llama")
    p.add_argument("--transports", default="direct,ray", help="for the T=2 plan")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, help="default: batch / 4")
    p.add_argument("--inline-bytes", type=int, default=4 << 20, help="Ray's max_direct_call_object_size (default: "
                   "onnxshard's 4 MiB; Ray's own default is 100 KB)")
    args = p.parse_args()
    if args.model == "bert":
        model = models.transformer(layers=args.layers, d=args.d, heads=args.d // 64, ffn=4 * args.d)
        title = f"BERT-style encoder: {args.layers} layers, d={args.d}, {args.d // 64} heads"
    else:
        model = models.llama(layers=args.layers, d=args.d, heads=8, kv_heads=4, ffn=4 * args.d)
        title = f"LLaMA-style decoder: {args.layers} layers, d={args.d}, 8 heads / 4 KV heads"
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((args.batch, args.seq, args.d)).astype(np.float32),
             "mask": np.ones((args.batch, args.seq), np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = models.save(model, Path(tmp) / "model", external=True)
        whole = onnxshard.plan(path, Path(tmp) / "t1", stages=1)
        split = onnxshard.plan(path, Path(tmp) / "t2", stages=1, tensor_parallel=2)
        runs = [("1 stage x T=1, 2 threads", whole, {"cpus_per_stage": 2})]
        runs += [(f"1 stage x T=2, {t}", split, {"transport": t}) for t in args.transports.split(",")]
        runs.append(("2 stages x T=1", onnxshard.plan(path, Path(tmp) / "s2", stages=2), {}))
        total = whole.stages[0].param_bytes
        print(f"{title}, {human_bytes(total)} of weights; batch {args.batch} x {args.seq}")
        baselines = []
        for threads in (1, 2):
            session = open_session(path, RuntimeConfig(intra_op_threads=threads))
            baselines.append(timed(f"ORT whole model, {threads} thread(s)", lambda s=session: s.run(None, feeds),
                                   args.batch, args.repeats))
        rows, memory = list(baselines), []
        start_local_ray(2, {"max_direct_call_object_size": args.inline_bytes})
        for name, plan, options in runs:
            with Pipeline(plan, micro_batch_size=args.micro_batch_size or max(1, args.batch // 4), **options) as pipe:
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

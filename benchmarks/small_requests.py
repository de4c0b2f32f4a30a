"""A stream of small requests to an LSTM, where ONNX Runtime's threads barely help: the pipeline (each request one
micro-batch, stages or replicas working on different requests at once) against ORT on the whole model running the
same requests one after another, and against W one-thread ORT processes each running its share (the ceiling for W
workers); then both with dynamic batching (consecutive requests joined up to --coalesce samples:
``Pipeline.stream(coalesce=N)``, and the same joining done by hand around ORT). The rows take turns, repeat by
repeat, so a drift in the machine's speed reaches them all alike.

    .venv/bin/python benchmarks/small_requests.py [--model lstm|bilstm] [--requests 60] [--batch 4] [--seq 64]
        [--layers 4] [--inputs 64] [--hidden 256] [--coalesce 16] [--stages 2 | --workers W]
        [--transport ray|direct ...] [--max-in-flight N]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import ray

import onnxshard
from onnxshard import models
from onnxshard.bench import data_parallel_name, data_parallel_runner, interleaved, paired_ratio, start_local_ray, table
from onnxshard.distributed import microbatch
from onnxshard.runtime import RuntimeConfig, open_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["lstm", "bilstm"], default="lstm",
                   help="lstm: --layers equal stacked layers; bilstm: one bidirectional LSTM that is most of the "
                   "work, between two projections (the issue's tagger)")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inputs", type=int, default=64, help="features per time step")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--workers", type=int, help="plan for this many workers (stages x replicas, plan(workers=W)) "
                   "instead of --stages")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--coalesce", type=int, default=16, help="samples per joined batch for the dynamic-batching rows "
                   "(0: leave them out)")
    p.add_argument("--transport", action="append", choices=["ray", "direct"],
                   help="transports to time (repeatable; default both)")
    p.add_argument("--max-in-flight", type=int, help="micro-batches in flight (default: the pipeline's)")
    args = p.parse_args()
    args.transport = args.transport or ["ray", "direct"]

    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((args.seq, args.batch, args.inputs)).astype(np.float32)}
                for _ in range(args.requests)]
    samples = args.requests * args.batch
    built = models.lstm(layers=args.layers, inputs=args.inputs, hidden=args.hidden) if args.model == "lstm" else \
        models.bilstm(inputs=args.inputs, hidden=args.hidden)
    transports = [(t, None) for t in args.transport] + [(t, args.coalesce) for t in args.transport if args.coalesce]
    workers = args.workers or args.stages
    # Every pipeline stays up while the rows take turns (see bench.interleaved): Ray gets a logical CPU per
    # worker of each; a worker's ORT threads come from its own 1 CPU, and an idle pipeline costs ~1% of a core.
    start_local_ray(workers * len(transports))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = models.save(built, Path(tmp) / "m", external=True)
        plan = onnxshard.plan(model, Path(tmp) / "p", stages=None if args.workers else args.stages,
                              workers=args.workers, example_inputs=requests[0])
        shape = f"{plan.num_stages} stage(s) x {plan.replicas} replica(s) x 1 thread"
        runs = {}
        for threads in (1, workers):
            s = open_session(model, RuntimeConfig(intra_op_threads=threads, provider="cpu"))
            runs[f"ORT whole model, {threads} thread(s), one by one"] = lambda s=s: [s.run(None, r) for r in requests]
        # The ceiling for any scheme of W single-thread workers on W cores: each process runs its share.
        runs[data_parallel_name(workers)] = stack.enter_context(
            data_parallel_runner(model, [requests[i::workers] for i in range(workers)]))
        if args.coalesce:
            # Dynamic batching, for the pipeline and (to be fair) for ORT: requests joined up to --coalesce samples.
            axes = microbatch.BatchAxes({"x": 1}, {"y": 1})
            s = open_session(model, RuntimeConfig(intra_op_threads=workers, provider="cpu"))

            def ort_joined():
                for feeds, sizes in microbatch.coalesce(requests, axes, args.coalesce):
                    microbatch.unmerge(dict(zip(["y"], s.run(None, feeds))), axes, sizes)

            runs[f"ORT whole model, {workers} threads, joined to {args.coalesce}"] = ort_joined
        pipes = {}
        for transport, coalesce in transports:
            name = f"onnxshard {shape}, {transport}, stream" + (f", coalesce {coalesce}" if coalesce else "")
            pipe = pipes[name] = stack.enter_context(onnxshard.Pipeline(
                # joined batches get the default: sized from the measured costs ("auto")
                plan, micro_batch_size="auto" if coalesce else args.batch, cpus_per_stage=1, transport=transport,
                max_in_flight=args.max_in_flight))
            runs[name] = lambda pipe=pipe, coalesce=coalesce: list(pipe.stream(requests, coalesce=coalesce))
        rows = interleaved(runs, samples, args.repeats)
        what = f"stacked LSTM {args.layers} x {args.hidden}" if args.model == "lstm" else \
            f"bidirectional LSTM {args.hidden} between two projections"
        print(f"{what}, {args.requests} requests of batch {args.batch} x seq {args.seq}; medians of {args.repeats}, "
              "the rows taking turns")
        print(table(rows, rows[:3]))
        ceiling = rows[2]
        print(f"paired against {ceiling.name} (the median of each round's ratio): " + ", ".join(
            f"{r.name.removeprefix('onnxshard ')} {paired_ratio(r, ceiling):.2f}x" for r in rows[3:]))
        for name, pipe in pipes.items():
            print(f"{name}, the last run:\n{pipe.stats.table()}")
    ray.shutdown()


if __name__ == "__main__":
    main()

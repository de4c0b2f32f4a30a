"""A stream of small requests to a stacked LSTM, where ONNX Runtime's threads barely help: the pipeline (each
request one micro-batch, stages working on different requests at once) against ORT on the whole model running the
same requests one after another; then both with dynamic batching (consecutive requests joined up to --coalesce
samples: ``Pipeline.stream(coalesce=N)``, and the same joining done by hand around ORT).

    .venv/bin/python benchmarks/small_requests.py [--requests 60] [--batch 4] [--seq 64] [--layers 4] [--inputs 64]
        [--hidden 256] [--coalesce 16] [--stages 2 | --workers W]
        [--transport ray|direct ...] [--max-in-flight N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import ray

import onnxshard
from onnxshard import models
from onnxshard.bench import data_parallel, start_local_ray, table, timed
from onnxshard.distributed import microbatch
from onnxshard.runtime import RuntimeConfig, open_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

    start_local_ray(args.stages)
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((args.seq, args.batch, args.inputs)).astype(np.float32)}
                for _ in range(args.requests)]
    samples = args.requests * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        model = models.save(models.lstm(layers=args.layers, inputs=args.inputs, hidden=args.hidden), Path(tmp) / "m",
                            external=True)
        plan = onnxshard.plan(model, Path(tmp) / "p", stages=None if args.workers else args.stages,
                              workers=args.workers)
        shape = f"{plan.num_stages} stage(s) x {plan.replicas} replica(s) x 1 thread"
        rows = []
        for threads in (1, args.stages):
            s = open_session(model, RuntimeConfig(intra_op_threads=threads, provider="cpu"))
            rows.append(timed(f"ORT whole model, {threads} thread(s), one by one",
                              lambda s=s: [s.run(None, r) for r in requests], samples, args.repeats))
        # The ceiling for any scheme of 2 single-thread workers on 2 cores: each process runs half the requests.
        rows.append(data_parallel(model, [requests[i::args.stages] for i in range(args.stages)], samples,
                                  args.repeats))
        stats = {}
        for transport in args.transport:
            with onnxshard.Pipeline(plan, micro_batch_size=args.batch, cpus_per_stage=1, transport=transport,
                                    max_in_flight=args.max_in_flight) as pipe:
                rows.append(timed(f"onnxshard {shape}, {transport}, stream",
                                  lambda: list(pipe.stream(requests)), samples, args.repeats))
                stats[transport] = pipe.stats
        if args.coalesce:
            # Dynamic batching, for the pipeline and (to be fair) for ORT: requests joined up to --coalesce samples.
            axes = microbatch.BatchAxes({"x": 1}, {"y": 1})
            s = open_session(model, RuntimeConfig(intra_op_threads=args.stages, provider="cpu"))

            def ort_joined():
                for feeds, sizes in microbatch.coalesce(requests, axes, args.coalesce):
                    microbatch.unmerge(dict(zip(["y"], s.run(None, feeds))), axes, sizes)

            rows.append(timed(f"ORT whole model, {args.stages} threads, joined to {args.coalesce}", ort_joined,
                              samples, args.repeats))
            for transport in args.transport:
                with onnxshard.Pipeline(plan, cpus_per_stage=1, transport=transport,
                                        max_in_flight=args.max_in_flight) as pipe:
                    rows.append(timed(f"onnxshard {shape}, {transport}, stream, coalesce "
                                      f"{args.coalesce}", lambda: list(pipe.stream(requests, coalesce=args.coalesce)),
                                      samples, args.repeats))
        print(f"stacked LSTM {args.layers} x {args.hidden}, {args.requests} requests of batch {args.batch} x seq "
              f"{args.seq}; medians of {args.repeats}")
        print(table(rows, rows[:3]))
        for transport, run in stats.items():
            print(f"{transport}, stream:\n{run.table()}")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Round-trip latency of ``pipe.run`` for one batch through a model that does next to no compute (three Negs),
cut into 1 and 2 stages: what a single caller waits for per call, coordinator and transport included; and the
start of the pipeline and its first call (a new pipeline's first request).

    .venv/bin/python benchmarks/round_trip.py [--mib 1] [--calls 300] [--transport direct|ray]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import onnx
import ray
from onnx import TensorProto as T
from onnx import helper as h

import onnxshard
from onnxshard.distributed import Pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=1.0)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--transport", choices=["direct", "ray"], default="direct")
    args = p.parse_args()
    width = int(args.mib * (1 << 20) / 4)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    nodes = [h.make_node("Neg", ["x"], ["a"]), h.make_node("Neg", ["a"], ["b"]), h.make_node("Neg", ["b"], ["y"])]
    graph = h.make_graph(nodes, "negs", [h.make_tensor_value_info("x", T.FLOAT, ["batch", width])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", width])])
    feeds = {"x": np.ones((1, width), np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), f"{tmp}/m.onnx")
        for stages in (1, 2):
            plan = onnxshard.plan(f"{tmp}/m.onnx", f"{tmp}/p{stages}", stages=stages)
            t0 = time.perf_counter()
            with Pipeline(plan, micro_batch_size=1, cpus_per_stage=1, transport=args.transport) as pipe:
                t1 = time.perf_counter()
                pipe.run(feeds)
                print(f"{stages} stage(s), {args.transport}: start {t1 - t0:.2f} s, first call "
                      f"{(time.perf_counter() - t1) * 1e3:.0f} ms")
                for _ in range(30):  # warm
                    pipe.run(feeds)
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    pipe.run(feeds)
                    times.append(time.perf_counter() - t0)
            q = statistics.quantiles(times, n=100)
            print(f"{stages} stage(s), {args.transport}: median {statistics.median(times) * 1e3:.2f} ms, "
                  f"p99 {q[98] * 1e3:.2f} ms over {args.calls} calls of {args.mib:g} MiB")
    ray.shutdown()


if __name__ == "__main__":
    main()

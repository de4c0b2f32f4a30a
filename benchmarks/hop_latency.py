"""Latency of stage-to-stage hops for a 1 MiB activation: plain Ray actor calls chained by ObjectRef (what the
pipeline uses) against Ray Compiled Graphs (shared-memory channels), for Arrow batches and raw numpy arrays.

    .venv/bin/python benchmarks/hop_latency.py [--mib 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()

    import ray
    from ray.dag import InputNode

    from onnxshard.bench import start_local_ray
    from onnxshard.runtime import arrow

    start_local_ray(4, {})

    @ray.remote(num_cpus=1)
    class Hop:
        def forward(self, x):
            return x

    a, b = Hop.remote(), Hop.remote()
    x = np.random.rand(int(args.mib * 2**20 / 4)).astype(np.float32)
    payloads = {"arrow": arrow.encode({"x": x}), "numpy": x}

    def median_ms(fn):
        for _ in range(10):
            fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    print(f"driver -> actor -> actor -> driver (3 transfers), {args.mib:g} MiB, median of {args.repeats}")
    rows = []
    for name, payload in payloads.items():
        rows.append((f"plain actor calls, {name}", median_ms(lambda p=payload: ray.get(b.forward.remote(
            a.forward.remote(p))))))
    with InputNode() as node:
        dag = b.forward.bind(a.forward.bind(node))
    compiled = dag.experimental_compile()
    for name, payload in payloads.items():
        rows.append((f"compiled graph, {name}", median_ms(lambda p=payload: ray.get(compiled.execute(p)))))
    for w in (a, b):  # teardown can stall on live actors
        ray.kill(w)
    compiled.teardown()
    for name, ms in rows:
        print(f"{name:<32} round trip {ms:7.2f} ms   per transfer ~{ms / 3:6.2f} ms")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Stage worker memory against its shard's weight bytes, with ONNX Runtime prepacking on and off.

    .venv/bin/python benchmarks/worker_memory.py [--mb 400]

Builds an MLP with about ``--mb`` MB of float32 weights in an external-data file, plans 2 stages, starts the
pipeline, runs one batch, and reads each worker's anonymous RSS (RssAnon: memory not backed by a file, so
memory-mapped weights do not count) and total RSS from /proc.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import ray
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxshard
from onnxshard import models
from onnxshard.bench import start_local_ray
from onnxshard.distributed import Pipeline
from onnxshard.memory import proc_status_bytes
from onnxshard.runtime import RuntimeConfig
from onnxshard.units import human_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=400)
    args = p.parse_args()
    width = 2048
    layers = max(2, args.mb * 10**6 // (width * width * 4))
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(nh.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.01, f"W{i}"))
        nodes += [h.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]), h.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x = f"r{i}"
    model = models.make_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", width])],
                              [h.make_tensor_value_info(x, T.FLOAT, ["batch", width])], inits)
    start_local_ray(2, {})
    with tempfile.TemporaryDirectory() as tmp:
        path = models.save(model, Path(tmp) / "model", external=True)
        del model, inits
        plan = onnxshard.plan(path, Path(tmp) / "plan", stages=2)
        feeds = {"x": np.ones((4, width), np.float32)}
        print(f"MLP {layers} x {width}x{width} float32, {human_bytes(sum(s.param_bytes for s in plan.stages))} "
              "of weights, 2 stages")
        print(f"{'prepacking':<11} {'stage':>5} {'shard weights':>14} {'anon RSS':>10} {'total RSS':>10} "
              f"{'anon / weights':>15}")
        for prepack in (True, False):
            with Pipeline(plan, micro_batch_size=2, runtime=RuntimeConfig(prepacking=prepack)) as pipe:
                pipe.run(feeds)
                for info, stage in zip((ranks[0] for ranks in pipe.worker_info[0]), plan.stages):
                    anon, rss = proc_status_bytes(info["pid"], "RssAnon"), proc_status_bytes(info["pid"], "VmRSS")
                    print(f"{str(prepack):<11} {stage.index:>5} {human_bytes(stage.param_bytes):>14} "
                          f"{human_bytes(anon):>10} {human_bytes(rss):>10} {anon / stage.param_bytes:>14.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()

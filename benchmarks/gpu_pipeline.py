"""The GPU check: a 2-stage plan on the CUDA execution provider, both stage workers sharing one GPU through
fractional ``num_gpus``, against ONNX Runtime CUDA on the whole model, on the same inputs, in one run.

    python benchmarks/gpu_pipeline.py [--layers 12 --d 768 --heads 12 --ffn 3072 --batch 16 --seq 128]

Needs ``onnxruntime-gpu`` and ``ray`` where it runs, and a GPU Ray can see; says which is missing otherwise. Prints
the workers' providers and GPUs, the throughput table, and the largest difference from ORT's outputs, on the whole
batch and on the pipeline's micro-batches (the same shapes, so the same kernels and TF32 rounding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--gpus-per-stage", type=float, default=0.5)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same script without a GPU, to check it before a GPU session")
    args = p.parse_args()
    on_gpu = args.provider == "cuda"

    import onnxruntime as ort

    if on_gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
              f"{ort.get_available_providers()}); install onnxruntime-gpu", file=sys.stderr)
        return 2
    import ray

    import onnxshard
    from onnxshard import models
    from onnxshard.bench import start_local_ray, table, timed
    from onnxshard.distributed import microbatch
    from onnxshard.runtime import RuntimeConfig
    from onnxshard.runtime.tools import model_runner

    start_local_ray(4)
    if on_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        print(f"Ray sees no GPU ({ray.cluster_resources()})", file=sys.stderr)
        return 2
    cuda = RuntimeConfig(provider=args.provider)
    gpus = args.gpus_per_stage if on_gpu else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        model = models.save(models.transformer(layers=args.layers, d=args.d, heads=args.heads, ffn=args.ffn),
                            Path(tmp) / "model", external=True)
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal((args.batch, args.seq, args.d)).astype(np.float32),
                 "mask": np.ones((args.batch, args.seq), np.float32)}
        plan = onnxshard.plan(model, Path(tmp) / "plan", stages=2)
        whole = model_runner(model, cuda)
        expected = whole(feeds)
        mb = args.micro_batch_size  # ORT on the pipeline's micro-batches: the same shapes, so the same kernels
        per_micro_batch = microbatch.run_per_micro_batch(whole, feeds, microbatch.infer_batch_axes(plan), mb)
        rows = [timed(f"ORT {args.provider}, whole model", lambda: whole(feeds), args.batch, args.repeats)]
        with onnxshard.Pipeline(plan, gpus_per_stage=gpus, cpus_per_stage=1, runtime=cuda,
                                micro_batch_size=args.micro_batch_size) as pipe:
            for ranks in pipe.worker_info[0]:
                print(f"stage {ranks[0]['stage']}: providers {ranks[0]['providers']}, pid {ranks[0]['pid']}")
            got = pipe.run(feeds)
            name = f"onnxshard 2 stages x {gpus:g} GPU ({pipe.transport})"
            rows.append(timed(f"{name}, micro-batch {args.micro_batch_size}", lambda: pipe.run(feeds), args.batch,
                              args.repeats))
            rows.append(timed(f"{name}, stream of 4 batches", lambda: list(pipe.stream([feeds] * 4)),
                              4 * args.batch, args.repeats))
            stats = pipe.stats
        print(f"transformer {args.layers} x d{args.d}, batch {args.batch} x seq {args.seq}, medians of "
              f"{args.repeats}")
        print(table(rows, rows[:1]))
        print(stats.table())
        for label, ref in (("the whole batch", expected), (f"micro-batches of {mb}", per_micro_batch)):
            print(f"max |pipeline - ORT {args.provider} on {label}|:",
                  {k: float(np.abs(got[k] - v).max()) for k, v in ref.items()})
        print("max |ORT output|:", {k: float(np.abs(v).max()) for k, v in expected.items()})
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

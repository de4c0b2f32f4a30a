"""Throughput of an onnxshard pipeline against plain ONNX Runtime on the same model and inputs, in one run.

    BERT-base-sized encoder:  .venv/bin/python benchmarks/pipeline_vs_ort.py --layers 12 --d 768 --heads 12 \
                                  --ffn 3072 --batch 16 --seq 128
    GPT-2-small-sized decoder: .venv/bin/python benchmarks/pipeline_vs_ort.py --model gpt2 --layers 12 --d 768 \
                                  --heads 12 --vocab 50257 --batch 16 --seq 128

Builds the model in code and runs `onnxshard bench` on it: medians of ``--repeats`` timed runs (after a warm-up)
and ratios against ORT on the whole model with 1 thread, with as many threads as stages, and as many 1-thread
processes as stages each on its share of the batch. The pipeline runs the batch alone and as a stream of 4.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import ray

from onnxshard import models
from onnxshard.bench import run_bench, start_local_ray
from onnxshard.cli_options import micro_batch_size_arg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["transformer", "gpt2"], default="transformer")
    p.add_argument("--vocab", type=int, default=50257, help="gpt2 vocabulary")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024, help="transformer MLP width (gpt2: 4 d)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--micro-batch-size", type=micro_batch_size_arg, default=2,
                   help="samples per micro-batch, or auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--transport", choices=["auto", "direct", "ray"], default="auto")
    p.add_argument("--profile", action="store_true", help="cut where measured per-node times balance")
    args = p.parse_args()

    start_local_ray(args.stages)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        if args.model == "gpt2":
            built = models.gpt2(layers=args.layers, d=args.d, heads=args.heads, vocab=args.vocab, max_seq=args.seq)
            feeds = {"ids": rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)}
            what = f"GPT-2-style decoder {args.layers} layers, d={args.d}, vocab {args.vocab}"
        else:
            built = models.transformer(layers=args.layers, d=args.d, heads=args.heads, ffn=args.ffn)
            feeds = {"x": rng.standard_normal((args.batch, args.seq, args.d)).astype(np.float32),
                     "mask": np.ones((args.batch, args.seq), np.float32)}
            what = f"transformer encoder {args.layers} layers, d={args.d}, ffn={args.ffn}"
        model = models.save(built, Path(tmp) / "model", external=True)
        print(f"{what}, batch {args.batch} x seq {args.seq}")
        print(run_bench(model, stages=args.stages, feeds=feeds, samples=args.batch,
                        micro_batch_size=args.micro_batch_size, repeats=args.repeats, transport=args.transport,
                        profile=args.profile))
    ray.shutdown()


if __name__ == "__main__":
    main()

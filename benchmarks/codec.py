"""Arrow tensor codec throughput against pickle, encode + decode of one tensor (default 64 MiB float32).

    .venv/bin/python benchmarks/codec.py [--mib 64] [--repeats 20]

Also reports whether the decoded array shares memory with the source (zero copy) for the Arrow path, and the
same through an in-process Arrow IPC stream (what a copy to another process costs at least).
"""

from __future__ import annotations

import argparse
import pickle

import numpy as np
import pyarrow as pa

from onnxshard.bench import timed
from onnxshard.runtime import arrow


def gbps(fn, nbytes: int, repeats: int) -> float:
    return timed("", fn, nbytes, repeats).throughput / 1e9


def ipc_round_trip(batch: pa.RecordBatch) -> pa.RecordBatch:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return pa.ipc.open_stream(sink.getvalue()).read_next_batch()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    x = np.random.default_rng(0).standard_normal(args.mib * 2**20 // 4).astype(np.float32)
    n = x.nbytes
    same = np.shares_memory(arrow.decode(arrow.encode({"x": x}))["x"], x)
    rows = [
        ("arrow codec encode+decode (in process)", gbps(lambda: arrow.decode(arrow.encode({"x": x})), n, args.repeats)),
        ("arrow codec + IPC stream (one copy)",
         gbps(lambda: arrow.decode(ipc_round_trip(arrow.encode({"x": x}))), n, args.repeats)),
        ("pickle protocol 5 dumps+loads", gbps(lambda: pickle.loads(pickle.dumps(x, protocol=5)), n, args.repeats)),
    ]
    print(f"{args.mib} MiB float32, median of {args.repeats}; arrow decode shares memory with the source: {same}")
    for name, rate in rows:
        print(f"{name:<44} {rate:8.2f} GB/s")


if __name__ == "__main__":
    main()

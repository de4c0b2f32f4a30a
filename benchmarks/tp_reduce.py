"""One all-reduce between tensor-parallel ranks: over the ranks' socket mesh against Ray's object store.

    .venv/bin/python benchmarks/tp_reduce.py [--mib 1] [--ranks 2] [--rounds 200]

Starts T Ray actors on this node. Mesh: the ranks are linked each to each by Unix sockets (``workers/rank_mesh.py``,
what the direct transport uses); in a round every rank sends its float32 partial (``--mib`` MiB) to the others as
an Arrow frame, reads theirs and sums them (``rank_shard.reduce``, as a rank's step does). The frames go through
the shared memory the ranks swap when they link (what ranks on one node do), and, for comparison, through the
sockets themselves. Ray: what the ray transport does per reduce step: one actor call per
rank that puts its partial in the shared-memory object store, then one per rank that gets the others' by ref and
sums. Prints the median time of a round (every rank done), per MiB.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import ray

from onnxshard.bench import start_local_ray
from onnxshard.plans import Reduce
from onnxshard.runtime import arrow
from onnxshard.runtime.rank_shard import reduce
from onnxshard.workers.rank_mesh import RankMesh

SUM = Reduce("p", "p", "sum")


class Rank:
    def __init__(self, rank: int, degree: int, mib: float):
        self.rank, self.degree = rank, degree
        self.part = np.full(int(mib * (1 << 20)) // 4, rank + 1, np.float32)
        self.part.flags.writeable = False  # as a rank's own values are (views of its Arrow batch)

    def open(self, folder: str, token: bytes, shared: bool) -> str:
        self.mesh = RankMesh(self.rank, self.degree, folder, None, token, shared=shared)
        return self.mesh.path

    def join(self, addresses):
        self.mesh.join(addresses)

    def mesh_rounds(self, rounds: int) -> list[float]:
        """Each round: send the partial to every other rank, read theirs, sum. The times of the rounds."""
        times, others = [], [r for r in range(self.degree) if r != self.rank]
        frame = arrow.assemble([arrow.tensor_to_column("p", self.part)])
        for i in range(rounds):
            t0 = time.perf_counter()
            for r in others:
                self.mesh.send(r, i, frame, {})
            got = {r: arrow.decode(self.mesh.receive(r, i)[1], ["p"], writable=True)["p"] for r in others}
            total = reduce([got.get(r, self.part) for r in range(self.degree)], SUM, scratch=True)
            times.append(time.perf_counter() - t0)
        assert total[0] == self.degree * (self.degree + 1) / 2, total[:3]
        return times

    def put(self):
        return ray.put(self.part)

    def reduce(self, *parts) -> float:  # Ray resolves the refs (from the object store) before the call
        return float(sum(parts)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=1.0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    start_local_ray(args.ranks + 1)
    actors = [ray.remote(num_cpus=1)(Rank).remote(r, args.ranks, args.mib) for r in range(args.ranks)]
    with tempfile.TemporaryDirectory() as folder:
        token, mesh = b"x" * 16, {}
        for shared in (True, False):
            addresses = ray.get([a.open.remote(folder, token, shared) for a in actors])
            ray.get([a.join.remote(addresses) for a in actors])
            per_rank = ray.get([a.mesh_rounds.remote(args.rounds) for a in actors])
            mesh[shared] = statistics.median(max(ts) for ts in zip(*per_rank))  # a round: every rank has its sum
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            refs = ray.get([a.put.remote() for a in actors])
            ray.get([a.reduce.remote(*refs) for a in actors])
            times.append(time.perf_counter() - t0)
        via_ray = statistics.median(times)
    print(f"all-reduce of {args.mib:g} MiB float32 over {args.ranks} ranks, median of {args.rounds} rounds:")
    for shared, how in ((True, "mesh, frames in shared memory:"), (False, "mesh, frames over the sockets:")):
        print(f"  {how:34s}{mesh[shared] * 1e3:.3f} ms ({mesh[shared] * 1e3 / args.mib:.3f} ms/MiB)")
    print(f"  Ray object store + actor calls:   {via_ray * 1e3:.3f} ms ({via_ray * 1e3 / args.mib:.3f} ms/MiB)")


if __name__ == "__main__":
    main()

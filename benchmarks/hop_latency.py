"""Latency of stage-to-stage hops for a 1 MiB activation: plain Ray actor calls chained by ObjectRef (the
pipeline's ``ray`` transport) against Ray Compiled Graphs (shared-memory channels), for Arrow batches and raw
numpy arrays; the direct links alone (echo actors) and their frames alone (two processes, no threads); then the
pipeline itself, with each of its transports, on a model that does next to no compute (three Negs) cut into 1, 2
and 3 stages: what a further stage adds to the round trip is one more hop, with the stage worker's own work around
its ORT run.

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

    frames_alone = frame_row(payloads["arrow"], median_ms)  # forks: before Ray starts its threads
    start_local_ray(4)

    @ray.remote(num_cpus=1)
    class Hop:
        def forward(self, x):
            return x

    a, b = Hop.remote(), Hop.remote()

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
    rows.append(("direct links, echo actors, arrow", direct_link_ms(payloads["arrow"], median_ms)))
    rows = [(name, ms, 3) for name, ms in rows] + [frames_alone]
    rows += pipeline_rows(payloads["numpy"], median_ms)
    for name, ms, transfers in rows:
        print(f"{name:<48} {ms:7.2f} ms   per transfer ~{ms / transfers:6.2f} ms   ({transfers} transfer(s))")
    ray.shutdown()


def frame_row(batch, median_ms) -> tuple[str, float, int]:
    """One frame from this process to a forked one over a socket pair (sender's buffer as the links set it),
    acknowledged with a byte: the wire format and the kernel's copies, without threads or Ray."""
    import os
    import socket

    from onnxshard.runtime import frames

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, frames.SEND_BUFFER)
    child = os.fork()
    if child == 0:
        ours.close()
        try:
            while True:
                frames.recv_frame(theirs)
                theirs.sendall(b"k")
        finally:
            os._exit(0)
    theirs.close()

    def one():
        frames.send_frame(ours, 0, batch, {})
        ours.recv(1)

    try:
        return "frame to another process (socket pair)", median_ms(one), 1
    finally:
        ours.close()
        os.waitpid(child, 0)


def direct_link_ms(batch, median_ms) -> float:
    """The pipeline's direct links alone: two actors that hand each frame straight on (no ORT, no coordinator
    bookkeeping), driver -> a -> b -> driver."""
    import itertools

    import ray

    from onnxshard.distributed.links import DirectLinks

    @ray.remote(num_cpus=1)
    class EchoLink:
        def open_link(self, folder=None, tcp=False, token=b""):  # on the driver's node: a Unix socket
            from onnxshard.workers.link import Link

            self.link = Link(lambda micro_batch, b, meta: (b, meta), folder, None, token)
            return self.link.path

        def start_link(self, downstream, hold_over=None, keep=0):  # the echo holds nothing back
            self.link.start(downstream)

    actors = [EchoLink.remote(), EchoLink.remote()]
    here = ray.get_runtime_context().get_node_id()
    links = DirectLinks([[[a] for a in actors]], [[[here], [here]]], 30.0, keep=4)  # per stage, per rank
    ids = itertools.count()

    def round_trip():
        i = next(ids)
        links.send(0, i, (batch, ()))
        links.take(0, i, None)

    try:
        return median_ms(round_trip)
    finally:
        links.close()
        for a in actors:
            ray.kill(a)


def pipeline_rows(x: np.ndarray, median_ms) -> list[tuple[str, float]]:
    """pipe.run round trips of a (1, n) float32 batch through a Neg -> Neg -> Neg model cut into 1, 2 and 3
    stages, per transport. The work is the same in each, so what a further stage adds is one more hop: an
    activation handed from one stage worker to the next, with everything the worker does around its ORT run."""
    import tempfile
    from pathlib import Path

    from onnx import TensorProto, helper

    import onnxshard
    from onnxshard import models

    names = ["x", "h1", "h2", "y"]
    graph = helper.make_graph([helper.make_node("Neg", [a], [b]) for a, b in zip(names, names[1:])], "hop",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", x.size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", x.size])])
    feeds = {"x": x.reshape(1, -1)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = models.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), Path(tmp) / "m")
        for transport in ("ray", "direct"):
            trips = []
            for stages in (1, 2, 3):
                plan = onnxshard.plan(model, Path(tmp) / f"p{stages}", cuts=names[1:stages])
                with onnxshard.Pipeline(plan, cpus_per_stage=1, transport=transport, micro_batch_size=1) as pipe:
                    trips.append(median_ms(lambda p=pipe: p.run(feeds)))
                rows.append((f"onnxshard pipeline, {transport}, {stages} stage(s)", trips[-1], stages + 1))
            rows += [(f"  {transport}: added by stage {k + 1} (one more hop)", b - a, 1)
                     for k, (a, b) in enumerate(zip(trips, trips[1:]), start=1)]
    return rows


if __name__ == "__main__":
    main()

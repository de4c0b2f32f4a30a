"""Direct links across Ray nodes, on one machine (``ray.cluster_utils.Cluster``: a head for the driver and worker
nodes, as Ray's own tests run a cluster):

- **a hop alone**: a frame echoed by a second process over a Unix socket and over TCP on loopback (round trip / 2);
- **round trips**: ``pipe.run`` of one batch through three Negs cut into 3 stages, the stages on one node (Unix
  hops), on three nodes (TCP hops) and on three nodes over Ray actor calls;
- **throughput**: a stream through a 3-stage transformer, its stages on one node against three nodes;
- **node loss**: a node holding a stage removed mid-stream, gracefully (the raylet says it goes) and by SIGKILL of
  its raylet and the stage worker (a crash: Ray itself notices only after its health checks): the seconds until
  the stream ends, all results checked equal to ORT.

    .venv/bin/python benchmarks/multinode.py [--mib 1] [--calls 200]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TOKEN = b"b" * 16


def _echo(where: str, ready) -> None:
    from onnxshard.runtime import frames

    server = frames.listen("onnxshard-bench-", 30, host="127.0.0.1") if where == "tcp" else \
        frames.listen("onnxshard-bench-", 30)
    ready.put(frames.address(server))
    peer = frames.accept(server, TOKEN)
    try:
        while True:
            frames.send_frame(peer, *frames.recv_frame(peer))
    except (OSError, ConnectionError):
        pass


def hop_alone(kind: str, mib: float, calls: int) -> float:
    from onnxshard.runtime import arrow, frames

    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=_echo, args=(kind, ready), daemon=True)
    child.start()
    sock = frames.connect(ready.get(timeout=30), token=TOKEN)
    batch = arrow.encode({"x": np.random.rand(int(mib * 2**18)).astype(np.float32)})
    times = []
    for i in range(calls + 20):
        t0 = time.perf_counter()
        frames.send_frame(sock, i, batch, {})
        frames.recv_frame(sock)
        times.append(time.perf_counter() - t0)
    sock.close()
    child.join(5)
    return statistics.median(times[20:]) / 2


def median_run_ms(pipe, feeds, calls: int) -> float:
    for _ in range(20):
        pipe.run(feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        pipe.run(feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def negs(folder: Path, mib: float):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    import onnxshard

    width = int(mib * 2**18)
    nodes = [h.make_node("Neg", ["x"], ["a"]), h.make_node("Neg", ["a"], ["b"]), h.make_node("Neg", ["b"], ["y"])]
    graph = h.make_graph(nodes, "negs", [h.make_tensor_value_info("x", T.FLOAT, ["batch", width])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", width])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), folder / "negs.onnx")
    return onnxshard.plan(folder / "negs.onnx", folder / "negs", stages=3), {"x": np.ones((1, width), np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=1.0)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--batches", type=int, default=48)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    import onnxshard
    from onnxshard import models
    from onnxshard.distributed import Pipeline
    from onnxshard.runtime import tools

    for kind in ("unix", "tcp"):
        print(f"hop alone, {kind}: {hop_alone(kind, args.mib, args.calls) * 1e3:.3f} ms for {args.mib:g} MiB "
              "(median of the round trip / 2)", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="onnxshard-multinode-"))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes.add_node(num_cpus=3, resources={"one": 3})
    singles = [nodes.add_node(num_cpus=1, resources={"single": 1}) for _ in range(5)]  # 3 stages and 2 to spare
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False, logging_level="ERROR")
    on_one = {"resources": {"one": 1}, "placement_strategy": "STRICT_PACK"}
    on_three = {"resources": {"single": 1}, "placement_strategy": "STRICT_SPREAD"}

    plan, feeds = negs(folder, args.mib)
    for name, where, transport in (("1 node, direct (Unix)", on_one, "direct"),
                                   ("3 nodes, direct (TCP)", on_three, "direct"),
                                   ("3 nodes, ray", on_three, "ray")):
        with Pipeline(plan, cpus_per_stage=1, micro_batch_size=1, transport=transport, **where) as pipe:
            print(f"3 Negs, 3 stages, {name} {pipe.hops}: pipe.run median "
                  f"{median_run_ms(pipe, feeds, args.calls):.2f} ms for {args.mib:g} MiB", flush=True)

    path = models.save(models.transformer(layers=6, d=256), folder / "tf")
    plan = onnxshard.plan(path, folder / "tf3", stages=3)
    batches = [tools.random_feeds(plan.inputs, dims={"batch": 8, "seq": 64}, seed=i) for i in range(args.batches)]
    references = [tools.run_model(path, f) for f in batches]
    for name, where in (("1 node", on_one), ("3 nodes", on_three)):
        rates = []
        with Pipeline(plan, cpus_per_stage=1, **where) as pipe:
            for _ in range(3):
                t0 = time.perf_counter()
                out = list(pipe.stream(batches))
                rates.append(len(batches) * 8 / (time.perf_counter() - t0))
                assert all(tools.max_differences(r, o) == {"y": 0.0} for r, o in zip(references, out))
        print(f"transformer stream, 3 stages, {name}: {statistics.median(rates):.1f} samples/s (median of 3: "
              f"{', '.join(f'{r:.1f}' for r in rates)})", flush=True)

    for graceful in (True, False):
        with Pipeline(plan, cpus_per_stage=1, resources={"single": 1}, placement_strategy="SPREAD",
                      micro_batch_size=2) as pipe:
            ids = {n.node_id: n for n in singles}
            victim = ids[pipe.worker_info[0][1][0]["node"]]
            out, removed_at = [], None
            t0 = time.perf_counter()
            for i, got in enumerate(pipe.stream(batches)):
                out.append(got)
                if i == 4:
                    removed_at = time.perf_counter()
                    if not graceful:  # a machine gone at once: its worker processes too
                        os.kill(pipe.worker_info[0][1][0]["pid"], signal.SIGKILL)
                    nodes.remove_node(victim, allow_graceful=graceful)
                    singles.remove(victim)
            end = time.perf_counter()
            assert all(tools.max_differences(r, o) == {"y": 0.0} for r, o in zip(references, out))
            rec = pipe.recoveries[-1] if pipe.recoveries else None
            print(f"node of stage 1 removed ({'graceful' if graceful else 'raylet and worker killed'}) after 5 of "
                  f"{len(batches)} batches: stream done {end - removed_at:.1f} s after the loss "
                  f"({end - t0:.1f} s in all), all equal to ORT; recovery: "
                  f"{rec.seconds if rec else None} s, {rec.replayed if rec else 0} micro-batches replayed, "
                  f"cause: {rec.cause[:100] if rec else None}", flush=True)
    ray.shutdown()
    nodes.shutdown()


if __name__ == "__main__":
    main()

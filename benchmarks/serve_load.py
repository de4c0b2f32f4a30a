"""Serving under load, on loopback: ``onnxshard serve`` (the KServe v2 app, a 2-stage pipeline per replica,
dynamic batching in the coordinator) against what a Ray Serve user writes today: one deployment holding one ORT
session on the whole model, with ``@serve.batch``, taking the same KServe v2 JSON requests (parsed by the same
code, so only the engine differs). Bounded: C client threads for a fixed time each, 127.0.0.1 only.

    .venv/bin/python benchmarks/serve_load.py [--clients 16] [--seconds 20] [--layers 4] [--d 256] [--seq 16]
        [--batch 1] [--max-batch-size 32] [--delay-ms 2] [--memory-cap-mb 0]

With ``--memory-cap-mb M`` every replica and stage worker runs under an RLIMIT_DATA of M MiB above the private
memory its process holds at start (a per-worker memory cap): the model's weights must then be over M for the
whole-model deployment and under it per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from onnxshard import models

CAP_ENV = "ONNXSHARD_BENCH_DATA_CAP"


def cap_memory() -> None:
    """worker_process_setup_hook: cap this process's private data at its current size plus $CAP_ENV bytes."""
    extra = int(os.environ.get(CAP_ENV, "0"))
    if extra:
        with open("/proc/self/status") as f:
            data_kib = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
        limit = data_kib * 1024 + extra
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


class OrtBatched:
    """Baseline: one ORT session on the whole model, requests joined by ``@serve.batch``."""

    def __init__(self, path: str, max_batch_size: int, delay_ms: float, threads: int):
        import onnxruntime as ort
        from ray import serve

        from onnxshard.plans import TensorSpec
        from onnxshard.serve import kserve

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.spec = kserve.ModelSpec("m", tuple(TensorSpec(i.name, "float32", tuple(i.shape))
                                                for i in self.session.get_inputs()),
                                     tuple(TensorSpec(o.name, "float32", tuple(o.shape))
                                           for o in self.session.get_outputs()))
        self.run_batch = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=delay_ms / 1e3)(
            self._run_batch)

    async def _run_batch(self, feeds_list):
        sizes = [next(iter(f.values())).shape[0] for f in feeds_list]
        joined = {k: np.concatenate([f[k] for f in feeds_list]) for k in feeds_list[0]}
        outputs = self.session.run(None, joined)
        names = [o.name for o in self.session.get_outputs()]
        cuts = np.cumsum(sizes)[:-1]
        return [dict(zip(names, parts)) for parts in zip(*(np.split(o, cuts) for o in outputs))]

    async def __call__(self, request):
        from starlette.responses import Response

        from onnxshard.serve import kserve

        parsed = kserve.parse_http(self.spec, await request.body(), None)
        results = await self.run_batch(parsed.feeds)
        body, _ = kserve.http_response(self.spec, parsed, results)
        return Response(body, media_type="application/json")


def load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client():
        session = requests.Session()
        mine = []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            r = session.post(url, data=body, timeout=60)
            if r.status_code == 200:
                mine.append(time.perf_counter() - t0)
            else:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests/s": len(lat) / wall, "p50 ms": 1e3 * lat[len(lat) // 2] if lat else float("nan"),
            "p99 ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "errors": errors[0], "n": len(lat)}


def _size(text: str):
    return text if text == "auto" else int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="samples per request")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-cap-mb", type=int, default=0)
    p.add_argument("--micro-batch-size", default="auto", help="onnxshard's (default auto)")
    args = p.parse_args()

    import ray
    from ray import serve

    from onnxshard.serve import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[CAP_ENV] = str(args.memory_cap_mb << 20)
    hook = {"worker_process_setup_hook": "serve_load.cap_memory", "env_vars": {CAP_ENV: os.environ[CAP_ENV]},
            "working_dir": str(Path(__file__).parent)} if args.memory_cap_mb else None
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env=hook)
    serve.start(http_options={"host": "127.0.0.1", "port": 18765})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.seq, args.d)).astype(np.float32)
    mask = np.zeros((args.batch, args.seq), np.float32)
    body = json.dumps({"inputs": [
        {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()},
        {"name": "mask", "shape": list(mask.shape), "datatype": "FP32", "data": mask.reshape(-1).tolist()}]}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = models.save(models.transformer(layers=args.layers, d=args.d, heads=8, ffn=4 * args.d),
                           Path(tmp) / "m", external=True)
        weights = sum(f.stat().st_size for f in path.parent.iterdir())
        print(f"model: transformer {args.layers} layers d={args.d}, {weights / 2**20:.1f} MiB; requests of "
              f"{args.batch} x {args.seq} tokens; {args.clients} clients x {args.seconds:g} s; 2 cores")
        apps = {
            "onnxshard serve, 2 stages": (build_app({"model": str(path), "stages": 2, "max_batch_size":
                                                     args.max_batch_size, "max_queue_delay_ms": args.delay_ms,
                                                     "micro_batch_size": _size(args.micro_batch_size)}),
                                          "/v2/models/m/infer"),
            "Ray Serve + ORT + @serve.batch": (serve.deployment(OrtBatched, max_ongoing_requests=256).options(
                ray_actor_options={"num_cpus": 2}).bind(str(path), args.max_batch_size, args.delay_ms, 2), "/"),
        }
        rows = {}
        for name, (app, route) in apps.items():
            try:
                serve.run(app, name="bench", route_prefix="/")
            except Exception as e:  # noqa: BLE001 - shown as the result (the memory cap)
                status = serve.status().applications.get("bench")
                why = [d.message for d in status.deployments.values() if d.message] if status else []
                print(f"{name}: failed to start: {str(e).strip().splitlines()[-1][:200]}")
                print("   ", (why[0] if why else "").strip().splitlines()[-1][:300] if why else "")
                serve.delete("bench")
                continue
            url = f"http://127.0.0.1:18765{route}"
            assert requests.post(url, data=body, timeout=60).status_code == 200
            load(url, body, args.clients, 3)  # warm-up
            one = [load(url, body, 1, args.seconds / 2)["p50 ms"] for _ in range(args.repeats)]
            runs = [load(url, body, args.clients, args.seconds) for _ in range(args.repeats)]
            rows[name] = {"requests/s": statistics.median(r["requests/s"] for r in runs),
                          "p50 ms": statistics.median(r["p50 ms"] for r in runs),
                          "p99 ms": statistics.median(r["p99 ms"] for r in runs),
                          "alone p50 ms": statistics.median(one), "errors": sum(r["errors"] for r in runs),
                          "runs": ", ".join(f"{r['requests/s']:.1f}" for r in runs)}
            serve.delete("bench")
        print(f"{'':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'c=1 p50':>8} {'errors':>6}  req/s per run")
        for name, r in rows.items():
            print(f"{name:34} {r['requests/s']:8.1f} {r['p50 ms']:8.1f} {r['p99 ms']:8.1f} {r['alone p50 ms']:8.1f} "
                  f"{r['errors']:6d}  {r['runs']}")
        if len(rows) == 2:
            a, b = rows.values()
            print(f"onnxshard / baseline: throughput {a['requests/s'] / b['requests/s']:.2f}x, p99 "
                  f"{a['p99 ms'] / b['p99 ms']:.2f}x, added latency at concurrency 1 "
                  f"{a['alone p50 ms'] - b['alone p50 ms']:+.1f} ms")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Batch inference over Parquet on Ray Data: ``onnxshard batch`` (a 2-stage pipeline in one pool actor, one file out
per file in, exactly once) against what a Ray user writes today: ``read_parquet(...).map_batches(OrtPredictor,
compute=ActorPoolStrategy(size=2))`` with one ORT session on the whole model per actor, 1 thread each, then
``write_parquet``. Same model, same files, same machine; runs alternate, medians reported. Ray gets 3 logical
CPUs on the 2 cores: 2 for the model's workers (2 stage workers, or 2 actors), 1 for Ray Data's read tasks (with
2, the baseline's actors would hold both and its read tasks would wait forever).

    .venv/bin/python benchmarks/batch.py [--rows 16384] [--files 16] [--layers 4] [--d 256] [--seq 16]
        [--batch-size 256] [--repeats 3] [--memory-cap-mb 0] [--object-store-mb 0]

onnxshard gets a plan made beforehand (``onnxshard plan``, timed apart), as a job over many files would.
The default data (16,384 rows, 256 MiB) is a 30-second job, where each side's start-up weighs; ``--rows 65536``
(1 GiB) shows the steady state.
``--memory-cap-mb M`` caps every Ray worker at M MiB of private data above what it holds at start (see
serve_load.py): with weights over M the baseline's actors cannot load the model, a stage can. ``--object-store-mb``
starts Ray with that object store (make the data several times larger to see memory stay flat).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxshard
from onnxshard import models


class OrtPredictor:
    """The baseline's ``map_batches`` class: one ORT session on the whole model."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (y,) = self.session.run(None, {"x": batch["x"], "mask": batch["mask"]})
        return {"id": batch["id"], "y": y}


def write_data(root: Path, rows: int, files: int, seq: int, d: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    root.mkdir()
    per = rows // files
    for f in range(files):
        x = np.random.default_rng(f).standard_normal((per, seq, d), dtype=np.float32)
        table = pa.table({"id": np.arange(f * per, (f + 1) * per), "x": ArrowTensorArray.from_numpy(x),
                          "mask": ArrowTensorArray.from_numpy(np.zeros((per, seq), np.float32))})
        pq.write_table(table, root / f"{f:03d}.parquet")
    return per * files


def run_onnxshard(plan: Path, data: Path, out: Path, batch_size: int, capped: bool = False):
    from onnxshard.data import job

    summary = job.run(str(plan), str(data), out, columns={}, keep=("id",), batch_size=batch_size, progress=False,
                      cpus_per_stage=1.0)
    return summary.rows, summary


def run_baseline(model: Path, data: Path, out: Path, batch_size: int, capped: bool = False):
    """``capped``: an actor that cannot load the model fails the job (Ray Data would restart it forever)."""
    import ray.data

    ds = ray.data.read_parquet(str(data)).map_batches(
        OrtPredictor, fn_constructor_kwargs={"path": str(model), "threads": 1}, batch_size=batch_size,
        batch_format="numpy", num_cpus=1, compute=ray.data.ActorPoolStrategy(size=2),
        **({"max_restarts": 0} if capped else {}))
    ds.write_parquet(str(out))
    return ray.data.read_parquet(str(out)).count(), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-cap-mb", type=int, default=0)
    p.add_argument("--object-store-mb", type=int, default=0)
    args = p.parse_args()

    import ray
    import ray.data
    from serve_load import CAP_ENV

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    here = str(Path(__file__).parent)  # on the workers' path (a working_dir upload fails after a restart)
    hook = {"worker_process_setup_hook": "serve_load.cap_memory", "env_vars": {
        CAP_ENV: str(args.memory_cap_mb << 20),
        "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}} \
        if args.memory_cap_mb else None

    def start_ray():
        """A fresh Ray: under a cap, each way gets new worker processes (a reused one would carry the memory the
        other way's tasks left in it)."""
        ray.shutdown()
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env=hook,
                 object_store_memory=(args.object_store_mb << 20) or None)
        ray.data.DataContext.get_current().enable_progress_bars = False

    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = models.save(models.transformer(layers=args.layers, d=args.d, heads=8, ffn=4 * args.d),
                            tmp / "m", external=True)
        weights = sum(f.stat().st_size for f in model.parent.iterdir())
        started = time.perf_counter()
        plan = onnxshard.plan(model, tmp / "plan", stages=2).root
        print(f"plan: 2 stages in {time.perf_counter() - started:.1f} s")
        rows = write_data(tmp / "in", args.rows, args.files, args.seq, args.d)
        data_mib = sum(f.stat().st_size for f in (tmp / "in").iterdir()) / 2**20
        print(f"model: transformer {args.layers} layers d={args.d}, {weights / 2**20:.1f} MiB of weights; {rows} rows "
              f"of {args.seq}x{args.d} in {args.files} Parquet files ({data_mib:.0f} MiB); batches of "
              f"{args.batch_size}; 2 cores" + (f"; memory cap {args.memory_cap_mb} MiB a worker" if args.memory_cap_mb
                                              else ""))
        ways = {"onnxshard batch, 2 stages x 1 thread": run_onnxshard,
                "map_batches + ORT, 2 actors x 1 thread": run_baseline}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for repeat in range(args.repeats):
            for name, way in ways.items():
                out = tmp / f"out-{repeat}-{len(times[name])}-{name[:9].replace(' ', '')}"
                if args.memory_cap_mb:
                    start_ray()
                started = time.perf_counter()
                try:
                    done, summary = way(plan if way is run_onnxshard else model, tmp / "in", out, args.batch_size,
                                        bool(args.memory_cap_mb))
                except Exception as e:  # noqa: BLE001 - shown as the result (the memory cap)
                    print(f"{name}: failed: {str(e).strip().splitlines()[-1][:300]}")
                    times[name].append(float("nan"))
                    continue
                seconds = time.perf_counter() - started
                assert done == rows, f"{name} wrote {done} rows of {rows}"
                times[name].append(seconds)
                print(f"  {name}: {rows / seconds:.1f} rows/s ({seconds:.1f} s)")
                if summary is not None and repeat == args.repeats - 1:
                    print("    " + summary.text().replace("\n", "\n    "))
                shutil.rmtree(out, ignore_errors=True)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"{'':42} {'rows/s':>9}  runs")
        for name, t in times.items():
            print(f"{name:42} {rows / medians[name]:9.1f}  " + ", ".join(f"{rows / s:.1f}" for s in t))
        a, b = medians.values()
        if a == a and b == b:  # neither failed (NaN)
            print(f"onnxshard / baseline: {b / a:.2f}x the rows/s")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""`onnxshard bench`: the pipeline against what a user would otherwise run, on the same model and inputs, in one
process run. Medians of several timed runs after a warm-up; ratios against baselines measured here."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from onnxshard.plans import Plan, is_plan_dir
from onnxshard.runtime import RuntimeConfig, open_session
from onnxshard.runtime.session import feed_dims


@dataclass(frozen=True)
class Timing:
    name: str
    seconds: list[float]
    samples: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def throughput(self) -> float:
        return self.samples / self.median


def timed(name: str, fn: Callable[[], object], samples: int, repeats: int) -> Timing:
    """``repeats`` timed calls of ``fn`` after one warm-up call."""
    return interleaved({name: fn}, samples, repeats)[0]


def interleaved(runs: dict[str, Callable[[], object]], samples: int, repeats: int) -> list[Timing]:
    """Each of ``runs`` (name -> fn) called once to warm up, then timed ``repeats`` times in rounds: each round
    times every fn once, in an order rotated from round to round. On a machine whose speed drifts (a VM's stolen
    time moved 8-36% within one run here) every row then sees the same drift, and their ratios compare."""
    names = list(runs)
    for fn in runs.values():
        fn()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - t0)
    return [Timing(n, seconds[n], samples) for n in names]


def paired_ratio(row: Timing, baseline: Timing) -> float:
    """For rows timed by :func:`interleaved`: the median over rounds of ``row``'s rate against ``baseline``'s in
    the same round, which a drift between rounds cancels out of."""
    return statistics.median((row.samples / r) / (baseline.samples / b)
                             for r, b in zip(row.seconds, baseline.seconds, strict=True))


def table(rows: list[Timing], baselines: list[Timing]) -> str:
    width = max(48, *(len(r.name) for r in rows))
    head = f"{'':<{width}} {'samples/s':>10} {'median ms':>10} {'spread ms':>13}" + "".join(
        f" {'vs ' + b.name[:18]:>22}" for b in baselines)
    lines = [head]
    for r in rows:
        spread = f"{min(r.seconds) * 1e3:.1f}-{max(r.seconds) * 1e3:.1f}"
        ratios = "".join(f" {r.throughput / b.throughput:>21.2f}x" for b in baselines)
        lines.append(f"{r.name:<{width}} {r.throughput:>10.1f} {r.median * 1e3:>10.1f} {spread:>13}{ratios}")
    return "\n".join(lines)


def start_local_ray(num_cpus: int, system_config: dict | None = None) -> None:
    """A quiet local Ray for a benchmark script; ``system_config`` defaults to what a Pipeline sets when it starts
    Ray itself (pass ``{}`` for Ray's own defaults)."""
    import ray

    from onnxshard.distributed.cluster import LOCAL_RAY_SYSTEM_CONFIG

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _system_config=LOCAL_RAY_SYSTEM_CONFIG if system_config is None else system_config)


# Data-parallel baseline: each process holds its own session and runs its share of the requests one by one.
_session = None
_shares: list[list[dict]] = []


def _init(model: str, shares: list[list[dict]], threads: int) -> None:
    global _session, _shares
    _session = open_session(model, RuntimeConfig(intra_op_threads=threads, provider="cpu"))
    _shares = shares


def _run_share(index: int) -> int:
    for feeds in _shares[index]:
        _session.run(None, feeds)
    return index


def data_parallel_name(processes: int) -> str:
    return f"ORT {processes} processes x 1 thread (data parallel)"


@contextmanager
def data_parallel_runner(model: str, shares: list[list[dict]]) -> Iterator[Callable[[], object]]:
    """One ORT process x 1 thread per share, started, and a function that runs every share once, each process its
    share's requests one after another: the data-parallel ceiling for that many single-thread workers."""
    processes = len(shares)
    with mp.get_context("spawn").Pool(processes, initializer=_init, initargs=(model, shares, 1)) as pool:
        yield lambda: pool.map(_run_share, range(processes), chunksize=1)


def batch_shares(feeds: dict, processes: int) -> list[list[dict]]:
    """``feeds`` cut along axis 0 into one request per process."""
    bounds = np.linspace(0, len(next(iter(feeds.values()))), processes + 1).astype(int)
    return [[{k: v[a:b] for k, v in feeds.items()}] for a, b in zip(bounds[:-1], bounds[1:])]


def run_bench(target: str | Path, *, stages: int = 2, feeds: dict[str, np.ndarray], samples: int,
              micro_batch_size: int | str | None = "auto", repeats: int = 5, address: str | None = None,
              batch_axes=None, data_parallel_axis0: bool = True, transport: str = "auto",
              stream_batches: int = 4, profile: bool = False, workers: int | None = None) -> str:
    """Baselines and the pipeline on ``feeds``; returns the printed report. The pipeline runs the batch alone
    (``run``: it fills and drains around it) and as a stream of ``stream_batches`` copies (``stream``: each batch
    fills the bubble of the one before, as in batch inference; each result is dropped as it comes, as ORT's are).
    A model is cut for ``feeds``: their sizes of its symbolic dims size the cost estimates; ``profile``: where ORT's
    measured per-node times on ``feeds`` balance instead; ``workers``: the plan's shape chosen for that many workers
    (``plan(workers=)``) instead of ``stages``. Baselines use as many threads (or processes) as the plan has
    workers."""
    from onnxshard.api import plan as make_plan
    from onnxshard.distributed import Pipeline

    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="onnxshard-bench-") as tmp:
        if is_plan_dir(target):
            the_plan, cut_for = Plan.load(target), ""
        else:  # cut for these inputs: their sizes of the model's symbolic dims (seq) size the cost estimates
            the_plan = make_plan(target, Path(tmp) / "plan", stages=None if workers else stages,
                                 example_inputs=feeds, profile=profile, workers=workers)
            sized = feed_dims(feeds, the_plan.inputs)  # the workload it was cut for (its costs leave the batch out)
            cut_for = " at " + ", ".join(f"{d}={n}" for d, n in sized.items()) if sized else ""
        k = the_plan.num_stages
        workers = the_plan.num_workers * the_plan.replicas
        model = the_plan.model
        with ExitStack() as stack:  # every row stays up while the rows take turns (see interleaved)
            runs = {}
            for threads in sorted({1, workers}):
                session = open_session(model, RuntimeConfig(intra_op_threads=threads, provider="cpu"))
                runs[f"ORT whole model, {threads} thread(s)"] = lambda s=session: s.run(None, feeds)
            if data_parallel_axis0 and workers > 1:
                runs[data_parallel_name(workers)] = stack.enter_context(
                    data_parallel_runner(model, batch_shares(feeds, workers)))
            pipe = stack.enter_context(Pipeline(the_plan, micro_batch_size=micro_batch_size, cpus_per_stage=1,
                                                address=address, batch_axes=batch_axes, transport=transport))
            name = f"onnxshard {k} stage{'s' if k > 1 else ''} x 1 thread" + \
                (f" x {pipe.config.replicas} replicas" if pipe.config.replicas > 1 else "") + f" ({pipe.transport})"
            ours = len(runs)  # the rows before are baselines
            runs[name] = lambda: pipe.run(feeds)
            if stream_batches > 1:
                runs[f"{name}, stream of {stream_batches} batches"] = \
                    lambda: deque(pipe.stream([feeds] * stream_batches), maxlen=0)
            rows = interleaved(runs, samples, repeats)
            size = micro_batch_size or "default"
            if size == "auto":
                size = f"auto ({pipe.auto_micro_batch_size(samples)})"
            pipe.run(feeds)
            stats = pipe.stats  # a run of the batch alone
    rows[ours] = replace(rows[ours], name=f"{rows[ours].name}, micro-batch {size}")
    if stream_batches > 1:
        rows[-1] = replace(rows[-1], samples=samples * stream_batches)
    baselines, rows = rows[:ours], rows[ours:]
    paired = [f"{r.name}: " + ", ".join(f"{paired_ratio(r, b):.2f}x of {b.name}" for b in baselines)
              for r in rows]
    report = [f"{model}: {samples} samples, medians of {repeats} runs after a warm-up; stages cut by "
              f"{the_plan.cost_source} cost{cut_for}",
              table(baselines + rows, baselines),
              "per round against the baselines timed in the same round (medians; a drift between rounds cancels):",
              *paired, stats.table()]
    return "\n".join(report)

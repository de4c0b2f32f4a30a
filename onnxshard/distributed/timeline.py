"""Drawing a run: a Gantt chart (one row per worker, a bar per micro-batch call) as HTML/SVG or PNG, and a
Chrome/Perfetto trace. The slowest stage is the row with the least white space."""

from __future__ import annotations

import html
import importlib.util
import json
import os
from pathlib import Path

from onnxshard.distributed.stats import RunStats
from onnxshard.errors import InputError
from onnxshard.files import atomic_writer, check_writable


def _rows(stats: RunStats):
    calls = [c for c in stats.calls if not c.failed]
    if not calls:
        return [], 0.0, 0.0
    t0 = min(c.started for c in calls)
    t1 = max(c.started + c.compute_s for c in calls)
    return calls, t0, max(t1 - t0, 1e-9)


def chrome_trace(stats: RunStats) -> dict:
    """Trace events for chrome://tracing or ui.perfetto.dev: one thread per worker, one slice per call."""
    calls, t0, _ = _rows(stats)
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": _tid(c), "args": {"name": _label(_worker(c))}}
              for c in calls]
    events += [{"name": f"mb {c.micro_batch}" + (f" step {c.step}" if c.rank or c.step else ""),
                "cat": f"stage {c.stage}", "ph": "X", "pid": 0, "tid": _tid(c), "ts": (c.started - t0) * 1e6,
                "dur": c.compute_s * 1e6, "args": {"micro_batch": c.micro_batch, "sent_bytes": c.sent_bytes,
                                                   "reduce_ms": c.reduce_s * 1e3}} for c in calls]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def html_timeline(stats: RunStats) -> str:
    calls, t0, span = _rows(stats)
    workers = sorted({_worker(c) for c in calls})
    width, row_h, left, top = 1000, 28, 150, 60
    height = top + row_h * len(workers) + 40
    bars = []
    for c in calls:
        y = top + workers.index(_worker(c)) * row_h
        x = left + (c.started - t0) / span * width
        w = max(c.compute_s / span * width, 0.5)
        hue = (c.micro_batch * 47) % 360
        bars.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="hsl({hue},60%,55%)">'
                    f"<title>stage {c.stage}, micro-batch {c.micro_batch}: {c.compute_s * 1e3:.2f} ms</title></rect>")
    labels = []
    for i, worker in enumerate(workers):
        s = stats.stages[worker[1]]
        labels.append(f'<text x="5" y="{top + i * row_h + 18}">{_label(worker)} '
                      f"({s.idle_fraction:.0%} idle)</text>")
    title = (f"{stats.samples} samples, {stats.micro_batches} micro-batches, {stats.wall_s * 1e3:.1f} ms; "
             f"measured efficiency {1 - _mean_idle(stats):.1%}, GPipe bound M/(M+K-1) = {stats.gpipe_bound:.1%}")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}" '
           f'font-family="sans-serif" font-size="12"><text x="5" y="20" font-size="14">{html.escape(title)}</text>'
           f'<text x="{left}" y="{height - 10}">0 ms</text><text x="{left + width - 60}" y="{height - 10}">'
           f"{span * 1e3:.1f} ms</text>{''.join(labels)}{''.join(bars)}</svg>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>onnxshard timeline</title></head><body>{svg}" \
           f"<pre>{html.escape(stats.table())}</pre></body></html>"


def _worker(c) -> tuple[int, int, int]:
    return c.replica, c.stage, c.rank


def _tid(c) -> int:
    return c.replica * 100000 + c.stage * 100 + c.rank


def _label(worker: tuple[int, int, int]) -> str:
    replica, stage, rank = worker
    return f"replica {replica} stage {stage}" + (f" rank {rank}" if rank else "")


def _mean_idle(stats: RunStats) -> float:
    return sum(s.idle_fraction for s in stats.stages) / max(1, len(stats.stages))


def check_timeline_path(path: str | os.PathLike) -> Path:
    """``path`` if a timeline (and its trace beside it) can be written there, else :class:`InputError`; call it
    before the run, so a bad path never costs the run's results."""
    path = check_writable(path, "--timeline", (".html", ".png"))
    if path.suffix.lower() == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise InputError(f"--timeline {path}: a .png timeline needs matplotlib (pip install matplotlib); "
                         ".html needs nothing")
    return path


def write_timeline(stats: RunStats, path: str | os.PathLike) -> list[Path]:
    """Write ``path`` (.html or .png) and a Chrome trace beside it (``.trace.json``), each atomically; return the
    files written."""
    path = check_timeline_path(path)
    trace = path.with_suffix(".trace.json")
    with atomic_writer(trace, "w") as f:
        f.write(json.dumps(chrome_trace(stats)))
    with atomic_writer(path, "wb" if path.suffix.lower() == ".png" else "w") as f:
        if path.suffix.lower() == ".png":
            _png(stats, f)
        else:
            f.write(html_timeline(stats))
    return [path, trace]


def _png(stats: RunStats, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls, t0, span = _rows(stats)
    workers = sorted({_worker(c) for c in calls})
    fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * len(workers)))
    for c in calls:
        ax.barh(workers.index(_worker(c)), c.compute_s * 1e3, left=(c.started - t0) * 1e3,
                color=plt.cm.tab20(c.micro_batch % 20))
    ax.set_yticks(range(len(workers)), [f"r{r} s{s}" + (f" t{t}" if t else "") for r, s, t in workers])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"efficiency {1 - _mean_idle(stats):.1%}, GPipe bound {stats.gpipe_bound:.1%}")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

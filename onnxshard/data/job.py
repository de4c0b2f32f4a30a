"""One ``onnxshard batch`` job: Parquet files in, one Parquet file out per input file, exactly once.

Ray Data reads the inputs (``include_paths``, ``include_row_hash``: each row knows its file and place), a pool of
:class:`~onnxshard.data.Predictor` actors runs the pipelines, and this driver commits: it routes each block's rows
to the writer of their input file, and when a file's last row is in (its row count is in its footer) renames the
output into place and adds the input to the manifest. A row delivered twice is an error, never a duplicate."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from onnxshard.data import files, provenance
from onnxshard.data.predictor import ERROR, ROW, predict
from onnxshard.distributed.stats import imbalance
from onnxshard.errors import InputError, WorkerError
from onnxshard.memory import PeakSampler, private_bytes


class Stats:
    """What each pool actor last reported (see :class:`~onnxshard.data.Predictor`'s ``stats``); a Ray actor."""

    def __init__(self):
        self.actors: dict[str, dict] = {}

    def add(self, key: str, report: dict) -> None:
        self.actors[key] = report

    def get(self) -> dict[str, dict]:
        return self.actors


@dataclass
class Summary:
    rows: int = 0
    rejected: int = 0
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)
    skipped_files: int = 0  # done by an earlier run (--resume)
    stage_busy: list[float] = field(default_factory=list)  # summed over the pool's pipelines
    actor_seconds: float = 0.0  # the pool actors' lifetimes, summed
    driver_memory: int = 0  # anonymous RSS in bytes, when the job started
    driver_peak: int = 0
    actor_peak: int = 0  # the largest of the pool actors'
    worker_peak: int = 0  # the largest of their stage workers' (those on the actor's node)

    def text(self) -> str:
        lines = [f"{self.rows} rows in {self.seconds:.1f} s ({self.rows / max(self.seconds, 1e-9):.1f} rows/s); "
                 f"wrote {len(self.written)} file(s)" + (f", {self.skipped_files} done before (--resume)"
                                                         if self.skipped_files else "")
                 + (f"; {self.rejected} row(s) rejected (see {files.REJECTS}/)" if self.rejected else "")]
        for stage, busy in enumerate(self.stage_busy):
            idle = max(0.0, self.actor_seconds - busy)
            lines.append(f"  stage {stage}: busy {busy:.1f} s, idle {idle:.1f} s "
                         f"({idle / max(self.actor_seconds, 1e-9):.0%} of the pipelines' time)")
        if (found := imbalance(self.stage_busy)) is not None:
            lines.append("  " + found.advice())
        mib = 1 << 20
        lines.append(f"  memory (anonymous RSS): driver {self.driver_memory / mib:.0f} MiB at the start, peak "
                     f"{self.driver_peak / mib:.0f} MiB; pool actor peak {self.actor_peak / mib:.0f} MiB; stage "
                     f"worker peak {self.worker_peak / mib:.0f} MiB")
        return "\n".join(lines)


class _Output:
    """The output (and rejects) of one input file, under temporary names until its last row is in."""

    def __init__(self, f: files.InputFile, out: Path):
        self.file, self.final, self.rows, self.rejected = f, out / f.output, 0, 0
        self.rejects_final = out / files.REJECTS / f.output
        self.tmp, self.rejects_tmp = files.temporary(self.final), files.temporary(self.rejects_final)
        self.writer = self.rejects_writer = None

    def add(self, table, rejects) -> bool:
        """Write a block's rows of this file; True once every row of the file is in."""
        import pyarrow.parquet as pq

        self.rows += table.num_rows + (rejects.num_rows if rejects is not None else 0)
        if self.rows > self.file.rows:
            raise WorkerError(f"{self.file.path}: {self.rows} rows came back for its {self.file.rows}: a batch was "
                              "delivered twice; the output was not written")
        if table.num_rows:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, table.schema)
            elif table.schema != self.writer.schema:
                raise InputError(f"{self.file.path}: its batches give outputs of different types ({table.schema} and "
                                 f"{self.writer.schema}); give its rows one shape")
            self.writer.write_table(table)
        if rejects is not None and rejects.num_rows:
            self.rejected += rejects.num_rows
            if self.rejects_writer is None:
                self.rejects_tmp.parent.mkdir(exist_ok=True)
                self.rejects_writer = pq.ParquetWriter(self.rejects_tmp, rejects.schema)
            self.rejects_writer.write_table(rejects)
        return self.rows == self.file.rows

    def commit(self) -> list[str]:
        """Close and rename into place (the rejects first: the output's presence means the file is whole)."""
        written = []
        for writer, tmp, final in ((self.rejects_writer, self.rejects_tmp, self.rejects_final),
                                   (self.writer, self.tmp, self.final)):
            if writer is not None:
                writer.close()
                files.publish(tmp, final)
                written.append(str(final))
        return written

    def abort(self) -> None:
        for writer, tmp in ((self.writer, self.tmp), (self.rejects_writer, self.rejects_tmp)):
            if writer is not None:
                writer.close()
                tmp.unlink(missing_ok=True)


def run(target: str, input_spec: str, out: Path, *, columns: dict[str, str], keep: tuple[str, ...],
        outputs: tuple[str, ...] | None = None, replicas: int = 1, batch_size: int = 256, on_error: str = "raise",
        resume: bool = False, progress: bool = True, **options) -> Summary:
    """Run the job (Ray must be up). ``options`` go to each pipeline."""
    import pyarrow.parquet as pq
    import ray
    import ray.data

    reserved = [k for k in keep if k in (provenance.PATH, provenance.ROW_HASH, ERROR, ROW)]
    if reserved:
        raise InputError(f"--keep {reserved}: onnxshard batch uses these column names itself")
    inputs, fs = files.list_inputs(input_spec)
    clash = [c for c in (provenance.PATH, provenance.ROW_HASH) if c in pq.read_schema(inputs[0].path,
                                                                                       filesystem=fs).names]
    if clash:
        raise InputError(f"{inputs[0].path} has column(s) {clash}, which Ray Data's reader replaces with the file "
                         "and row of each row; rename them")
    settings = {"target": os.path.abspath(target), "columns": columns, "keep": list(keep),
                "outputs": list(outputs) if outputs else None}
    manifest = files.Manifest(out, settings, resume=resume)
    files.clear_partial(out)
    todo = manifest.todo(inputs)
    summary = Summary(skipped_files=len(inputs) - len(todo), driver_memory=private_bytes())
    for f in [f for f in todo if f.rows == 0]:  # nothing to run: done as they are
        manifest.finish(f, 0)
    todo = [f for f in todo if f.rows]
    if not todo:
        return summary
    stats = ray.remote(num_cpus=0)(Stats).remote()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    started = time.perf_counter()
    with PeakSampler() as sampler:
        try:
            reading = reading_cpus(ray.cluster_resources().get("CPU", 0.0), target, replicas, options)
            ds = predict(ray.data.read_parquet([f.path for f in todo], filesystem=fs, include_paths=True,
                                               include_row_hash=True, **({} if reading is None else
                                                                         {"num_cpus": reading})),
                         target, replicas=replicas, batch_size=batch_size, columns=columns,
                         keep=(*keep, provenance.PATH), outputs=outputs, on_error=on_error, stats=stats, **options)
            _commit(ds.iter_batches(batch_size=None, batch_format="pyarrow"), todo, out, keep, manifest, summary)
        finally:
            summary.seconds = time.perf_counter() - started
            _add_stats(summary, stats)
    summary.driver_peak = sampler.peak
    return summary


def _commit(blocks, todo: list[files.InputFile], out: Path, keep: tuple[str, ...], manifest: files.Manifest,
            summary: Summary) -> None:
    """Route each block's rows to the output of their input file; commit each file when its last row is in."""
    import pyarrow.compute as pc

    by_path = {f.path: f for f in todo}
    open_: dict[str, _Output] = {}
    try:
        for block in blocks:
            paths = block.column(provenance.PATH)
            for path in pc.unique(paths).to_pylist():
                rows = block.filter(pc.equal(paths, path))
                bad = None
                if ERROR in rows.column_names:
                    is_bad = pc.not_equal(rows.column(ERROR), "")
                    bad = rows.filter(is_bad).select([*keep, ROW, ERROR]).rename_columns([*keep, "row", "error"])
                    rows = rows.filter(pc.invert(is_bad))
                rows = rows.drop_columns([c for c in (provenance.PATH, ERROR, ROW) if c in rows.column_names])
                if path not in by_path:
                    raise WorkerError(f"a row came back from {path!r}, which is not an input of this job")
                output = open_.setdefault(path, _Output(by_path[path], out))
                if output.add(rows, bad):
                    summary.written += output.commit()
                    manifest.finish(output.file, output.rejected)
                    summary.rows += output.rows - output.rejected
                    summary.rejected += output.rejected
                    del open_[path]
        if open_:
            short = {p: f"{o.rows} of {o.file.rows}" for p, o in open_.items()}
            raise WorkerError(f"rows went missing: {short} came back; the files were not written (--resume reruns "
                              "them)")
    finally:
        for output in open_.values():
            output.abort()


def _add_stats(summary: Summary, stats) -> None:
    """The pool actors' reports into the summary (left out if the stats actor does not answer)."""
    import ray

    try:
        actors = ray.get(stats.get.remote(), timeout=10)
        ray.kill(stats)
    except Exception:  # noqa: BLE001 - a summary without stage times is still a summary
        return
    if actors:
        summary.stage_busy = [sum(v) for v in zip(*(a["busy"] for a in actors.values()))]
        summary.actor_seconds = sum(a["wall"] for a in actors.values())
        summary.actor_peak = max(a["peak_memory"] for a in actors.values())
        summary.worker_peak = max(a["worker_peak_memory"] for a in actors.values())


def reading_cpus(cluster_cpus: float, target: str, replicas: int, options: dict) -> float | None:
    """The CPUs each Parquet read task asks for: Ray Data's default (``None``: 1) while the stage workers leave a
    CPU free, else what they leave (0 when they hold all: reading then runs beside them rather than waiting
    forever for a CPU no one gives back)."""
    from onnxshard.plans import Plan, is_plan_dir

    per_pipeline = (sum(s.tensor_parallel for s in Plan.load(target).stages) if is_plan_dir(target)
                    else options.get("stages") or 2) * options.get("replicas", 1)
    free = cluster_cpus - replicas * per_pipeline * options.get("cpus_per_stage", 1.0)
    return None if free >= 1 else max(0.0, free)

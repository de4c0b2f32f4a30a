"""The ``onnxshard batch`` command line (argparse only: Ray loads when it runs)."""

from __future__ import annotations


def add_parser(sub, *, positive_int, positive_float, non_negative_float) -> None:
    p = sub.add_parser("batch", help="run a plan (or a model) over Parquet files on Ray Data, writing Parquet")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--input", required=True, help="Parquet file, folder or glob (local path or a URI Ray reads)")
    p.add_argument("--output", required=True, help="folder to write Parquet to (must not exist or be empty; "
                   "written under a temporary name and renamed when the job succeeds)")
    p.add_argument("--columns", action="append", default=[], metavar="INPUT=COLUMN",
                   help="the column feeding a model input, where their names differ (repeatable)")
    p.add_argument("--keep", default="", metavar="COL,...", help="input columns written beside the outputs (an id)")
    p.add_argument("--replicas", type=positive_int, default=1, help="pool actors, each owning a whole pipeline")
    p.add_argument("--batch-size", type=positive_int, default=256, help="rows per Ray Data batch (default 256)")
    p.add_argument("--stages", type=positive_int, help="stages, when TARGET is a model (default 2)")
    p.add_argument("--cpus-per-stage", type=positive_float, default=1.0, help="CPUs per stage worker")
    p.add_argument("--gpus-per-stage", type=non_negative_float, default=0.0, help="GPUs per stage worker")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import os
    import secrets
    import shutil
    import time
    from pathlib import Path

    from onnxshard.errors import InputError
    from onnxshard.plans import Plan, is_plan_dir

    columns = {}
    for item in args.columns:
        name, _, column = item.partition("=")
        if not name or not column:
            raise InputError(f"--columns {item!r} must look like INPUT=COLUMN")
        columns[name] = column
    keep = tuple(k for k in args.keep.split(",") if k)
    out = Path(os.path.abspath(args.output))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--output {out} exists and is not an empty folder; give a new folder")
    if not out.parent.is_dir():
        raise InputError(f"--output {out}: folder {out.parent} does not exist; create it first")
    if is_plan_dir(args.target):
        Plan.load(args.target)  # refuse a broken plan before Ray starts
    elif not Path(args.target).is_file():
        raise InputError(f"{args.target} is neither a plan folder nor an ONNX model file")

    import ray

    from onnxshard.data.predictor import predict
    from onnxshard.distributed import cluster

    owns = cluster.connect(args.address, 30.0)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"  # ours alone: no user's folder is touched
    try:
        import ray.data

        started = time.perf_counter()
        ds = predict(ray.data.read_parquet(args.input), args.target, replicas=args.replicas, batch_size=args.batch_size,
                     columns=columns, keep=keep, stages=args.stages, cpus_per_stage=args.cpus_per_stage,
                     gpus_per_stage=args.gpus_per_stage)
        try:
            ds.write_parquet(str(tmp))
        except Exception as e:  # Ray Data wraps the UDF's error: say what the data did wrong, in one line
            cause = _onnxshard_cause(e)
            if cause is None:
                raise
            raise cause from None
        seconds = time.perf_counter() - started
        rows = ray.data.read_parquet(str(tmp)).count()
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        files = sorted(p.name for p in out.iterdir())
        print(f"{rows} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):.1f} rows/s); wrote {len(files)} "
              f"file(s) to {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if owns:
            ray.shutdown()
    return 0


def _onnxshard_cause(error: BaseException):
    """The OnnxShardError a UDF raised, from inside the exceptions Ray and Ray Data wrap around it (across the
    process boundary only its traceback text survives), or ``None``."""
    import re

    from onnxshard import errors

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, errors.OnnxShardError):
            return error
        found = re.findall(r"onnxshard\.errors\.(\w+): (.+)", str(error))
        if found:
            kind, message = found[-1]
            cls = getattr(errors, kind, errors.OnnxShardError)
            return (cls if isinstance(cls, type) and issubclass(cls, errors.OnnxShardError) else
                    errors.OnnxShardError)(message.strip())
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None

"""The ``onnxshard batch`` command line (argparse only: Ray loads when it runs)."""

from __future__ import annotations


def add_parser(sub, *, positive_int, positive_float, non_negative_float) -> None:
    p = sub.add_parser("batch", help="run a plan (or a model) over Parquet files on Ray Data, writing Parquet")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--input", required=True, help="Parquet file or folder (searched recursively): a path every node "
                   "can read, or a URI pyarrow opens (s3://, gs://, hdfs://, file://); or a local glob")
    p.add_argument("--output", required=True, help="folder for one Parquet file per input file (new or empty; each "
                   "file is written under a temporary name and renamed when whole)")
    p.add_argument("--columns", action="append", default=[], metavar="INPUT=COLUMN",
                   help="the column feeding a model input, where their names differ (repeatable)")
    p.add_argument("--keep", default="", metavar="COL,...", help="input columns written beside the outputs (an id)")
    p.add_argument("--replicas", type=positive_int, default=1, help="pool actors, each owning a whole pipeline")
    p.add_argument("--batch-size", type=positive_int, default=256, help="rows per Ray Data batch (default 256)")
    p.add_argument("--stages", type=positive_int, help="stages, when TARGET is a model (default 2)")
    p.add_argument("--cpus-per-stage", type=positive_float, default=1.0, help="CPUs per stage worker")
    p.add_argument("--gpus-per-stage", type=non_negative_float, default=0.0, help="GPUs per stage worker")
    p.add_argument("--resume", action="store_true", help="finish the job that wrote --output before (its manifest "
                   "says which input files are done; they are skipped)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="a row the model cannot take: "
                   "fail naming its file, row and column (raise, the default), or write it to OUTPUT/_rejects/ with "
                   "the reason and go on (skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (Ray Data's)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from onnxshard.cli_options import name_pairs
    from onnxshard.errors import InputError
    from onnxshard.plans import Plan, is_plan_dir

    columns = name_pairs(args.columns, "--columns", "INPUT=COLUMN")
    keep = tuple(k for k in args.keep.split(",") if k)
    out = Path(os.path.abspath(args.output))
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file; give a folder")
    if not out.parent.is_dir():
        raise InputError(f"--output {out}: folder {out.parent} does not exist; create it first")
    if is_plan_dir(args.target):
        Plan.load(args.target)  # refuse a broken plan before Ray starts
    elif not Path(args.target).is_file():
        raise InputError(f"{args.target} is neither a plan folder nor an ONNX model file")
    from onnxshard.data.files import check_output, list_inputs

    check_output(out, args.resume)  # refuse before Ray starts
    list_inputs(args.input)  # refuse missing or unreadable input before Ray starts

    import ray

    from onnxshard.data import job
    from onnxshard.distributed import cluster

    owns = cluster.connect(args.address, 30.0)
    try:
        try:
            summary = job.run(args.target, args.input, out, columns=columns, keep=keep, replicas=args.replicas,
                              batch_size=args.batch_size, on_error=args.on_error, resume=args.resume,
                              progress=not args.no_progress, stages=args.stages, cpus_per_stage=args.cpus_per_stage,
                              gpus_per_stage=args.gpus_per_stage)
        except Exception as e:  # Ray Data wraps the UDF's error: say what the data did wrong, in one line
            cause = _onnxshard_cause(e)
            if cause is None:
                raise
            raise cause from None
        print(summary.text() + f"\noutput: {out}")
    finally:
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

"""The ``onnxshard`` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from onnxshard import plan_store
from onnxshard.cli_options import (
    dims_of,
    micro_batch_size_arg,
    non_negative_float,
    pipeline_options,
    placement_of,
    plan_kwargs,
    plan_options,
    positive_float,
    positive_int,
    transport_option,
)
from onnxshard.errors import InputError, OnnxShardError
from onnxshard.files import check_writable, load_npz, save_npz
from onnxshard.plans import Plan, is_plan_dir
from onnxshard.units import human_bytes


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Every error is one line on stderr (the rest of a long message, or the traceback of an
    unexpected error, with ``--verbose``) and exit code 2; a verification mismatch is exit code 1."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"onnxshard: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    verbose = getattr(args, "verbose", False)
    try:
        return args.handler(args) or 0
    except OnnxShardError as e:
        _error(str(e), verbose)
        return 2
    except KeyboardInterrupt:
        print("onnxshard: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback behind --verbose
        _error(f"internal error, please report it: {type(e).__name__}: {e}", verbose,
               traceback.format_exc() if verbose else None)
        return 2


def _error(message: str, verbose: bool, details: str | None = None) -> None:
    first, _, rest = message.strip().partition("\n")
    if verbose:
        print(f"onnxshard: error: {message.strip()}", file=sys.stderr)
        if details:
            print(details, file=sys.stderr)
        return
    more = " (--verbose for details)" if rest.strip() else ""
    print(f"onnxshard: error: {first}{more}", file=sys.stderr)


class UsageError(Exception):
    """A command line argparse refuses."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage and exiting, so every error is one line."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxshard", description=__doc__.strip() + " Split ONNX models into "
                     "pipeline stages and run them on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="print whole error messages and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("plan", help="split a model into pipeline stages and write a plan folder")
    p.add_argument("model", help="the .onnx file (its external weights stay where they are)")
    p.add_argument("--out", required=True, help="plan folder to write (created; replaced if it holds a plan)")
    p.add_argument("--inputs", dest="example_inputs", metavar="FILE.npz", help="example inputs of the workload: "
                   "their sizes of the symbolic dims size the costs (and --profile runs on them)")
    plan_options(p)
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("inspect", help="print the stage table of a plan folder, or a model's summary")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--tensors", action="store_true", help="list a model's tensors (candidates for --cut)")
    p.add_argument("--inputs", dest="example_inputs", metavar="FILE.npz", help="example inputs: their sizes of the "
                   "symbolic dims size the costs")
    plan_options(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("verify", help="run the stages one after another in ORT and compare with the whole model")
    p.add_argument("target", help="a plan folder or an .onnx file (planned on the fly)")
    p.add_argument("--inputs", help=".npz file of inputs (default: random inputs that fit the model)")
    p.add_argument("--tolerance", type=non_negative_float, default=1e-5,
                   help="max absolute difference allowed (default 1e-5)")
    p.add_argument("--micro-batch-size", type=positive_int, metavar="M", help="run the stages and ORT per "
                   "micro-batch of M samples, as the pipeline does (for models whose samples depend on each other)")
    p.add_argument("--weights", action="store_true", help="also hash every byte of the plan's weight files against "
                   "the digests recorded at plan time (loading checks sizes and a sample)")
    plan_options(p)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("run", help="run a plan (or a model, planned on the fly) as a pipeline on Ray")
    p.add_argument("target", help="a plan folder, a plan's URI (s3://bucket/plan, gs://..., file:///...: each worker "
                   "copies only its stage's files and weight ranges to its node), or an .onnx file")
    p.add_argument("--inputs", required=True, help=".npz file of model inputs")
    p.add_argument("--outputs", required=True, help=".npz file to write the model outputs to")
    p.add_argument("--stages", type=positive_int, help="stages, when TARGET is a model (default 2)")
    p.add_argument("--timeline", metavar="FILE", help="draw the run as a Gantt chart (.html or .png) and write a "
                   "Chrome/Perfetto trace beside it (.trace.json)")
    pipeline_options(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("bench", help="time the pipeline against plain ONNX Runtime on the same model and inputs")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--stages", type=positive_int, default=2, help="stages, when TARGET is a model (default 2)")
    p.add_argument("--workers", type=positive_int, metavar="W", help="when TARGET is a model, plan it for W workers "
                   "(stages x replicas, see plan --workers) instead of --stages")
    p.add_argument("--inputs", help=".npz file of inputs (default: random, sized by --batch and --dim)")
    p.add_argument("--batch", type=positive_int, default=16, help="batch size of random inputs (default 16)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic dim in the random inputs (a model is cut for the inputs' sizes)")
    p.add_argument("--micro-batch-size", type=micro_batch_size_arg, default="auto",
                   help="samples per micro-batch, or 'auto' (default)")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--batch-dim", help="the symbolic dim name of the batch")
    p.add_argument("--address", help="Ray address (default: a local embedded Ray)")
    p.add_argument("--profile", action="store_true", help="when TARGET is a model, cut it where ORT's measured "
                   "per-node times on the inputs balance (not analytic FLOPs)")
    transport_option(p)
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("demo", help="plan a small transformer, run it as a pipeline on local Ray, check it")
    p.add_argument("--stages", type=positive_int, default=2)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq", type=positive_int, default=64)
    p.add_argument("--layers", type=positive_int, default=6)
    p.add_argument("--micro-batch-size", type=positive_int, default=4)
    p.add_argument("--address", help="Ray address (default: a local embedded Ray)")
    p.set_defaults(handler=cmd_demo)

    from onnxshard.data.cli import add_parser as add_batch_parser
    from onnxshard.generate_cli import add_parser as add_generate_parser
    from onnxshard.serve.cli import add_parser as add_serve_parser

    for add in (add_batch_parser, add_serve_parser, add_generate_parser):
        add(sub, positive_int=positive_int, positive_float=positive_float, non_negative_float=non_negative_float)
    for command in sub.choices.values():  # --verbose after the command too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="print whole error messages and tracebacks")
    return parser


def cmd_plan(args) -> int:
    from onnxshard.api import plan

    result = plan(args.model, args.out, **plan_kwargs(args))
    print(result.table())
    print(f"wrote {len(result.stages)} stage(s) to {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from onnxshard import partitioner
    from onnxshard.api import example_dims, plan
    from onnxshard.partitioner.cost import input_dims
    from onnxshard.plan_text import unsized_note
    from onnxshard.plans import unsized
    from onnxshard.runtime.tools import probe_types

    if is_plan_dir(args.target):
        loaded = Plan.load(args.target)
        print(loaded.table())
        if loaded.num_stages > 1:
            print(loaded.boundaries())
        return 0
    if args.stages or args.cut or args.max_stage_memory or args.tensor_parallel:
        with tempfile.TemporaryDirectory(prefix="onnxshard-inspect-") as tmp:
            result = plan(args.target, Path(tmp) / "plan", **plan_kwargs(args))
            print(result.table())
            if result.num_stages > 1:
                print(result.boundaries())
        return 0
    examples = plan_kwargs(args)["example_inputs"]
    dims = {**(example_dims(examples, args.target) if examples is not None else {}), **dims_of(args)}
    analysis = partitioner.analyse_model(args.target, dims=dims, type_oracle=probe_types,
                                         allow_domains=args.allow_domain)
    costs = analysis.costs
    g = analysis.graph
    print(f"model {args.target}: {len(g.nodes)} nodes (+{len(g.constants)} Constants), "
          f"{human_bytes(sum(c.param_bytes for c in costs))} of weights, "
          f"{sum(c.flops for c in costs) / 1e9:.4f} GFLOP/sample")
    for kind, names in (("input", g.inputs), ("output", g.outputs)):
        for name in names:
            spec = analysis.specs.get(name)
            print(f"  {kind:<6} {name}: {spec.dtype if spec else '?'} {list(spec.shape) if spec and spec.shape else '?'}")
    if left := unsized(input_dims(g, analysis.specs, dims)):
        print(unsized_note(left))
    if args.tensors:
        from onnxshard.partitioner.cost import tensor_bytes

        print(f"{'position':>8}  {'tensor':<40} {'B/sample':>10}  made by")
        for i, node in enumerate(g.nodes):
            for out in node.output:
                spec = analysis.specs.get(out)
                print(f"{i:>8}  {out:<40} {tensor_bytes(spec, analysis.dims):>10}  {node.op_type} {node.name}")
    return 0


def cmd_verify(args) -> int:
    from onnxshard.api import verify

    feeds = load_npz(args.inputs) if args.inputs else None
    target = args.target if is_plan_dir(args.target) else Path(args.target)
    options = {} if is_plan_dir(args.target) else {k: v for k, v in plan_kwargs(args).items() if k not in ("dims",)}
    if args.weights:
        if not is_plan_dir(args.target):
            raise InputError("--weights checks a plan folder's weight files; give a plan folder")
        target = Plan.load(args.target, full_check=True)
        print(f"weights: every byte of {len(target.weights.files)} file(s) matches the digests recorded at plan time")
    result = verify(target, feeds=feeds, dims=dims_of(args), tolerance=args.tolerance,
                    micro_batch_size=args.micro_batch_size, **options)
    print(result.plan.table())
    print(result.report())
    return 0 if result.ok else 1


def _batch_axes(args):
    if args.batch_dim:
        return args.batch_dim
    if not args.batch_axis:
        return None
    axes = {}
    for item in args.batch_axis:
        name, _, axis = item.rpartition("=")
        if not name or not (axis.isdigit() or axis.lower() == "none"):
            raise InputError(f"--batch-axis {item!r} must look like TENSOR=AXIS, e.g. --batch-axis state=1")
        axes[name] = None if axis.lower() == "none" else int(axis)
    return axes


def cmd_run(args) -> int:
    # Everything that can be checked is checked before Ray starts (seconds) and the batch runs (minutes): the
    # output paths, the inputs file, and the inputs against what the plan declares.
    out = check_writable(args.outputs, "--outputs")
    if args.timeline:
        from onnxshard.distributed.timeline import check_timeline_path

        check_timeline_path(args.timeline)
    feeds = load_npz(args.inputs)
    batch_axes = _batch_axes(args)
    from onnxshard.runtime.session import check_feeds

    with tempfile.TemporaryDirectory(prefix="onnxshard-run-") as tmp:
        if plan_store.is_uri(args.target) or is_plan_dir(args.target):  # by URI, the workers copy what they need
            plan = plan_store.open_plan(args.target)
            check_feeds(feeds, plan.inputs, where="model")
        else:  # planned at the sizes of the inputs (a sequence length, an image size), as a Pipeline does
            from onnxshard.api import plan as make_plan
            from onnxshard.partitioner.analysis import input_specs

            check_feeds(feeds, input_specs(args.target), where="model")  # before planning: the same message
            plan = make_plan(args.target, Path(tmp) / "plan", stages=args.stages or 2, example_inputs=feeds)
        from onnxshard.distributed import Pipeline

        options = dict(micro_batch_size=args.micro_batch_size, replicas=args.replicas,
                       cpus_per_stage=args.cpus_per_stage, gpus_per_stage=args.gpus_per_stage, batch_axes=batch_axes,
                       transport=args.transport, call_timeout_s=args.call_timeout, run_timeout_s=args.run_timeout,
                       **placement_of(args))
        with Pipeline(plan, address=args.address, **options) as pipe:
            print(pipe.plan.table())
            outputs = pipe.run(feeds, progress=_progress_bar())
            print(pipe.stats.table())
    save_npz(out, outputs)  # the results first: a picture that fails must not lose them
    print(f"wrote {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())} to {out}")
    if args.timeline:
        from onnxshard.distributed.timeline import write_timeline

        print("timeline:", ", ".join(str(p) for p in write_timeline(pipe.stats, args.timeline)))
    return 0


def _progress_bar():
    """A one-line progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, submitted: int) -> None:
        width = 30
        filled = width * done // max(submitted, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{submitted} micro-batches")
        if done == submitted:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cmd_bench(args) -> int:
    from onnxshard.bench import run_bench
    from onnxshard.runtime.tools import random_feeds

    target = Path(args.target)
    plan_inputs = Plan.load(target).inputs if is_plan_dir(args.target) else None
    if args.inputs:
        feeds = load_npz(args.inputs)
    else:
        if plan_inputs is None:
            from onnxshard.partitioner import input_specs

            plan_inputs = input_specs(target)
        dims = dims_of(args)
        batch_dim = args.batch_dim or next((d for t in plan_inputs for d in (t.shape or ())[:1] if isinstance(d, str)),
                                           None)
        if batch_dim:
            dims.setdefault(batch_dim, args.batch)
        feeds = random_feeds(plan_inputs, dims=dims)
    samples = next(iter(feeds.values())).shape[0] if feeds else 1
    print(run_bench(target, stages=args.stages, feeds=feeds, samples=samples, micro_batch_size=args.micro_batch_size,
                    repeats=args.repeats, address=args.address, batch_axes=args.batch_dim, transport=args.transport,
                    profile=args.profile, workers=args.workers))
    return 0


def cmd_demo(args) -> int:
    from onnxshard.demo import run_demo

    return run_demo(stages=args.stages, batch=args.batch, seq=args.seq, layers=args.layers,
                    micro_batch_size=args.micro_batch_size, address=args.address)



if __name__ == "__main__":
    sys.exit(main())

"""The ``onnxshard`` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxshard.errors import InputError, OnnxShardError
from onnxshard.plan import Plan, human_bytes, is_plan_dir


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except OnnxShardError as e:
        print(f"onnxshard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxshard: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxshard", description=__doc__.strip() + " Split ONNX models into "
                                     "pipeline stages and run them on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="split a model into pipeline stages and write a plan folder")
    p.add_argument("model", help="the .onnx file (its external weights stay where they are)")
    p.add_argument("--out", required=True, help="plan folder to write (created; replaced if it holds a plan)")
    _plan_options(p)
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("inspect", help="print the stage table of a plan folder, or a model's summary")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--tensors", action="store_true", help="list a model's tensors (candidates for --cut)")
    _plan_options(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("verify", help="run the stages one after another in ORT and compare with the whole model")
    p.add_argument("target", help="a plan folder or an .onnx file (planned on the fly)")
    p.add_argument("--inputs", help=".npz file of inputs (default: random inputs that fit the model)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max absolute difference allowed (default 1e-5)")
    _plan_options(p)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("run", help="run a plan (or a model, planned on the fly) as a pipeline on Ray")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--inputs", required=True, help=".npz file of model inputs")
    p.add_argument("--outputs", required=True, help=".npz file to write the model outputs to")
    p.add_argument("--stages", type=int, help="stages, when TARGET is a model (default 2)")
    p.add_argument("--timeline", metavar="FILE", help="draw the run as a Gantt chart (.html or .png) and write a "
                   "Chrome/Perfetto trace beside it (.trace.json)")
    _pipeline_options(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("bench", help="time the pipeline against plain ONNX Runtime on the same model and inputs")
    p.add_argument("target", help="a plan folder or an .onnx file")
    p.add_argument("--stages", type=int, default=2, help="stages, when TARGET is a model (default 2)")
    p.add_argument("--inputs", help=".npz file of inputs (default: random, sized by --batch and --dim)")
    p.add_argument("--batch", type=int, default=16, help="batch size of random inputs (default 16)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic dim in the random inputs (a model is cut for the inputs' sizes)")
    p.add_argument("--micro-batch-size", type=micro_batch_size_arg, default="auto",
                   help="samples per micro-batch, or 'auto' (default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-dim", help="the symbolic dim name of the batch")
    p.add_argument("--address", help="Ray address (default: a local embedded Ray)")
    p.add_argument("--profile", action="store_true", help="when TARGET is a model, cut it where ORT's measured "
                   "per-node times on the inputs balance (not analytic FLOPs)")
    _transport_option(p)
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("demo", help="plan a small transformer, run it as a pipeline on local Ray, check it")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--address", help="Ray address (default: a local embedded Ray)")
    p.set_defaults(handler=cmd_demo)
    return parser


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--micro-batch-size", type=micro_batch_size_arg, default="auto",
                   help="samples per micro-batch, or 'auto' (default: sized from measured stage costs; the first "
                   "batch is split into ~4 x stages x replicas micro-batches)")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel copies of the pipeline")
    p.add_argument("--cpus-per-stage", type=float, default=1.0, help="CPUs per stage worker (= ORT threads)")
    p.add_argument("--gpus-per-stage", type=float, default=0.0, help="GPUs per stage worker (fractions share one)")
    p.add_argument("--batch-axis", action="append", default=[], metavar="TENSOR=AXIS",
                   help="batch axis of an input or output (repeatable; AXIS 'none' for no batch axis)")
    p.add_argument("--batch-dim", help="the symbolic dim name of the batch, e.g. batch_size")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local embedded Ray)")
    _transport_option(p)


def _transport_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=["auto", "direct", "ray"], default="auto",
                   help="how micro-batches travel between stages: direct (Unix sockets, one node), ray (actor "
                   "calls, any cluster), auto (default: direct where it applies)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, help="number of pipeline stages")
    p.add_argument("--cut", action="append", default=[], metavar="TENSOR",
                   help="start a new stage after the node making TENSOR (repeatable)")
    p.add_argument("--max-stage-memory", metavar="SIZE", help="weight bytes per worker, e.g. 2GB; "
                   "without --stages, the fewest stages that fit; without --tensor-parallel, the degree too")
    p.add_argument("--tensor-parallel", type=int, metavar="T",
                   help="split each stage's layers over T rank workers (Megatron-style column/row splits)")
    p.add_argument("--profile", action="store_true", help="balance measured ORT per-node times, not FLOPs")
    p.add_argument("--optimize", action="store_true", help="apply ORT's extended fusions before cutting")
    p.add_argument("--copy-weights", action="store_true", help="write a self-contained copy of each stage's weights")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic dim, for costs and random inputs (repeatable)")
    p.add_argument("--allow-domain", action="append", default=[], metavar="DOMAIN",
                   help="accept ops of this custom domain (your ORT has a custom-op library for it)")


def micro_batch_size_arg(text: str) -> int | str:
    """An argparse type: a positive number of samples, or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'auto'")
    return int(text)


def _dims(args) -> dict[str, int]:
    dims = {}
    for item in args.dim:
        name, _, size = item.partition("=")
        if not name or not size.isdigit():
            raise InputError(f"--dim {item!r} must look like NAME=SIZE, e.g. --dim seq=128")
        dims[name] = int(size)
    return dims


def _plan_kwargs(args) -> dict:
    return dict(stages=args.stages, cuts=args.cut, max_stage_memory=args.max_stage_memory, profile=args.profile,
                optimize=args.optimize, copy_weights=args.copy_weights, dims=_dims(args),
                allow_domains=args.allow_domain, tensor_parallel=args.tensor_parallel)


def cmd_plan(args) -> int:
    from onnxshard.api import plan

    result = plan(args.model, args.out, **_plan_kwargs(args))
    print(result.table())
    print(f"wrote {len(result.stages)} stage(s) to {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from onnxshard import partitioner
    from onnxshard.api import plan
    from onnxshard.runtime.tools import probe_types

    if is_plan_dir(args.target):
        loaded = Plan.load(args.target)
        print(loaded.table())
        if loaded.num_stages > 1:
            print(loaded.boundaries())
        return 0
    if args.stages or args.cut or args.max_stage_memory or args.tensor_parallel:
        with tempfile.TemporaryDirectory(prefix="onnxshard-inspect-") as tmp:
            result = plan(args.target, Path(tmp) / "plan", **_plan_kwargs(args))
            print(result.table())
            if result.num_stages > 1:
                print(result.boundaries())
        return 0
    analysis = partitioner.analyse_model(args.target, dims=_dims(args), type_oracle=probe_types,
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

    feeds = _load_npz(args.inputs) if args.inputs else None
    target = args.target if is_plan_dir(args.target) else Path(args.target)
    options = {} if is_plan_dir(args.target) else {k: v for k, v in _plan_kwargs(args).items() if k not in ("dims",)}
    result = verify(target, feeds=feeds, dims=_dims(args), tolerance=args.tolerance, **options)
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
    from onnxshard.distributed import Pipeline

    feeds = _load_npz(args.inputs)
    target = args.target if is_plan_dir(args.target) else Path(args.target)
    options = dict(micro_batch_size=args.micro_batch_size, replicas=args.replicas, cpus_per_stage=args.cpus_per_stage,
                   gpus_per_stage=args.gpus_per_stage, batch_axes=_batch_axes(args), transport=args.transport)
    with Pipeline(target, stages=args.stages, address=args.address, **options) as pipe:
        print(pipe.plan.table())
        outputs = pipe.run(feeds, progress=_progress_bar())
        print(pipe.stats.table())
    if args.timeline:
        from onnxshard.distributed.timeline import write_timeline

        print("timeline:", ", ".join(str(p) for p in write_timeline(pipe.stats, args.timeline)))
    np.savez(args.outputs, **outputs)
    print(f"wrote {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())} to {args.outputs}")
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
        feeds = _load_npz(args.inputs)
    else:
        if plan_inputs is None:
            from onnxshard.partitioner import input_specs

            plan_inputs = input_specs(target)
        dims = _dims(args)
        batch_dim = args.batch_dim or next((d for t in plan_inputs for d in (t.shape or ())[:1] if isinstance(d, str)),
                                           None)
        if batch_dim:
            dims.setdefault(batch_dim, args.batch)
        feeds = random_feeds(plan_inputs, dims=dims)
    samples = next(iter(feeds.values())).shape[0] if feeds else 1
    print(run_bench(target, stages=args.stages, feeds=feeds, samples=samples, micro_batch_size=args.micro_batch_size,
                    repeats=args.repeats, address=args.address, batch_axes=args.batch_dim, transport=args.transport,
                    profile=args.profile))
    return 0


def cmd_demo(args) -> int:
    from onnxshard.demo import run_demo

    return run_demo(stages=args.stages, batch=args.batch, seq=args.seq, layers=args.layers,
                    micro_batch_size=args.micro_batch_size, address=args.address)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read inputs from {path}: {e}; write them with numpy.savez") from e


if __name__ == "__main__":
    sys.exit(main())

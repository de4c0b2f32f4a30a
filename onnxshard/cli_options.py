"""The command line's shared pieces: argument types, the options of planning and of running a pipeline, and the
planner's keyword arguments from them (argparse only)."""

from __future__ import annotations

import argparse
import math

from onnxshard.errors import InputError
from onnxshard.files import load_npz


def pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--micro-batch-size", type=micro_batch_size_arg, default="auto",
                   help="samples per micro-batch, or 'auto' (default: sized from measured stage costs; the first "
                   "batch is split into ~4 x stages x replicas micro-batches)")
    p.add_argument("--replicas", type=positive_int, help="data-parallel copies of the pipeline (default: the "
                   "plan's, 1 unless it was planned with --workers)")
    p.add_argument("--cpus-per-stage", type=positive_float, default=1.0, help="CPUs per stage worker (= ORT threads)")
    p.add_argument("--gpus-per-stage", type=non_negative_float, default=0.0,
                   help="GPUs per stage worker (fractions share one)")
    p.add_argument("--batch-axis", action="append", default=[], metavar="TENSOR=AXIS",
                   help="batch axis of an input or output (repeatable; AXIS 'none' for no batch axis)")
    p.add_argument("--batch-dim", help="the symbolic dim name of the batch, e.g. batch_size")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default="PACK",
                   help="how the stage workers' placement group spreads over nodes (SPREAD: over several nodes)")
    p.add_argument("--resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each stage worker asks for, e.g. big_node=1 (repeatable)")
    p.add_argument("--call-timeout", type=positive_float, metavar="S", help="a stage call running longer counts "
                   "as a hung worker, replaced (default: 20 x the slowest call measured, at least 30 s)")
    p.add_argument("--run-timeout", type=positive_float, metavar="S",
                   help="fail the run if it is not done after S seconds (default: no limit beyond the call deadline)")
    transport_option(p)


def transport_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=["auto", "direct", "ray"], default="auto",
                   help="how micro-batches travel between stages: direct (sockets: Unix within a node, TCP between "
                   "nodes), ray (actor calls), auto (default: direct where it applies)")


def plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=positive_int, help="number of pipeline stages")
    p.add_argument("--cut", action="append", default=[], metavar="TENSOR",
                   help="start a new stage after the node making TENSOR (repeatable)")
    p.add_argument("--max-stage-memory", metavar="SIZE", help="weight bytes per worker, e.g. 2GB; "
                   "without --stages, the fewest stages that fit; without --tensor-parallel, the degree too")
    p.add_argument("--tensor-parallel", type=positive_int, metavar="T",
                   help="split each stage's layers over T rank workers (Megatron-style column/row splits)")
    p.add_argument("--workers", type=positive_int, metavar="W", help="choose stages x replicas for W workers "
                   "(without --stages): the best predicted throughput under the memory cap")
    p.add_argument("--profile", action="store_true", help="balance measured ORT per-node times, not FLOPs")
    p.add_argument("--optimize", action="store_true", help="apply ORT's extended fusions before cutting")
    p.add_argument("--copy-weights", action="store_true", help="write a self-contained copy of each stage's weights")
    p.add_argument("--hash-weights", action="store_true", help="record a sha256 of every weight byte (seconds per GB) "
                   "for `verify --weights`; files over 64 MiB otherwise get a sampled digest")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic dim, for costs and random inputs (repeatable)")
    p.add_argument("--allow-domain", action="append", default=[], metavar="DOMAIN",
                   help="accept ops of this custom domain (your ORT has a custom-op library for it)")
    p.add_argument("--kv-pair", action="append", default=[], metavar="PAST=PRESENT",
                   help="a decoder's cache input and the output that extends it, where the names are not "
                   "past_key_values.{i}.key / present.{i}.key (repeatable; found by name otherwise)")


def micro_batch_size_arg(text: str) -> int | str:
    """An argparse type: a positive number of samples, or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'auto'")
    return int(text)


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value




def dims_of(args) -> dict[str, int]:
    dims = {}
    for item in args.dim:
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise InputError(f"--dim {item!r} must look like NAME=SIZE with SIZE at least 1, e.g. --dim seq=128")
        dims[name] = int(size)
    return dims


def name_pairs(items: list[str], option: str, form: str) -> dict[str, str]:
    """``KEY=VALUE`` items of a repeatable option as a dict; an item of another form is refused naming ``form``."""
    pairs = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not value:
            raise InputError(f"{option} {item!r} must look like {form}")
        pairs[key] = value
    return pairs


def placement_of(args) -> dict:
    """The Pipeline options of ``--placement-strategy`` and ``--resource``."""
    resources = {}
    for name, amount in name_pairs(args.resource, "--resource", "NAME=AMOUNT").items():
        try:
            resources[name] = positive_float(amount)
        except argparse.ArgumentTypeError as e:
            raise InputError(f"--resource {name}={amount}: {e}") from None
    return {"placement_strategy": args.placement_strategy, "resources": resources}


def kv_pairs_of(args) -> dict[str, str] | None:
    return name_pairs(args.kv_pair, "--kv-pair", "PAST_INPUT=PRESENT_OUTPUT") or None


def plan_kwargs(args) -> dict:
    return dict(stages=args.stages, cuts=args.cut, max_stage_memory=args.max_stage_memory, profile=args.profile,
                optimize=args.optimize, copy_weights=args.copy_weights, dims=dims_of(args),
                allow_domains=args.allow_domain, tensor_parallel=args.tensor_parallel, hash_weights=args.hash_weights,
                kv_pairs=kv_pairs_of(args), workers=args.workers,
                example_inputs=load_npz(args.example_inputs) if getattr(args, "example_inputs", None) else None)

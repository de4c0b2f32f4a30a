"""Plans on any filesystem pyarrow opens: ``s3://bucket/plan``, ``gs://...``, ``hdfs://...``, ``file:///...``.

The driver reads ``plan.json`` alone, never a weight. Each stage worker copies what its own stage needs into a cache
on its node: the stage's ONNX files (checked by their sha256), and of each weight file only the byte ranges its
stage's tensors hold, written at their own offsets into a sparse file of the weight file's size. A weight file over
``FULL_CHECK_BYTES`` also gets the blocks its sampled digest reads, so it is checked as in a local plan; a smaller
one copied in part is checked by its size. The cache is keyed by the sha256 of ``plan.json``, which records
every stage file's sha256 and every weight file's digests: a changed plan is a new key. A second worker on the node
waits for the first (a file lock), finds what is there and copies only what is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import onnx

from onnxshard.digests import FULL_CHECK_BYTES, SAMPLE_BLOCK, SAMPLE_BLOCKS, sha256_file
from onnxshard.errors import PlanError
from onnxshard.partitioner.model import external_ref, is_external, iter_tensors
from onnxshard.plans import PLAN_FILE, Plan, contained

CACHE_ENV = "ONNXSHARD_CACHE"  # the node-local cache folder (default: onnxshard-plans in the temp folder)
READ_BLOCK = 64 << 20  # one read of a remote file at most this long
GAP = 1 << 20  # ranges closer than this are read as one


def is_uri(target) -> bool:
    """Whether ``target`` names a plan by URI (``scheme://...``) rather than a local path."""
    return isinstance(target, str) and "://" in target.split("?", 1)[0]


def open_plan(target: str | os.PathLike) -> Plan:
    """The plan at ``target``: a URI as :func:`read_plan` reads it, a folder as :meth:`Plan.load` does."""
    return read_plan(target) if is_uri(target) else Plan.load(target)


def read_plan(uri: str) -> Plan:
    """The plan at ``uri`` as the driver needs it: ``plan.json`` read and its wiring checked; no other file read."""
    fs, root = _open(uri)
    plan = Plan.from_json(_json(_read(fs, f"{root}/{PLAN_FILE}", uri)))
    plan = replace(plan, uri=uri)
    plan.check_wiring()
    _portable(plan, uri)
    return plan


def load_stage(uri: str, stage: int, cache: str | os.PathLike | None = None) -> Plan:
    """The plan at ``uri`` with stage ``stage``'s files in this node's cache (copied there if missing): a plan
    whose root is that copy, checked like a local plan for that stage's files and the weight files it reads."""
    fs, root = _open(uri)
    raw = _read(fs, f"{root}/{PLAN_FILE}", uri)
    local = Path(cache or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "onnxshard-plans")
    local = local / hashlib.sha256(raw).hexdigest()[:32]
    local.mkdir(parents=True, exist_ok=True)
    plan = Plan.from_json(_json(raw), local)
    _portable(plan, uri)
    if not 0 <= stage < plan.num_stages:
        raise PlanError(f"plan {uri} has {plan.num_stages} stages, not a stage {stage}")
    with _locked(local / ".lock"):
        if not (local / PLAN_FILE).is_file():
            _write_atomic(local / PLAN_FILE, raw)
        for name, digest in plan.stages[stage].files():
            target = contained(local, name, what=f"stage {stage} file")
            if not (target.is_file() and sha256_file(target) == digest):
                _fill(fs, root, local, name, None, None)
        checked = set()
        for name, ranges in weight_ranges(plan, stage).items():
            size = plan.weights.files[name]
            _fill(fs, root, local, name, size, ranges + sample_ranges(size))
            if size > FULL_CHECK_BYTES or merged(ranges, 0) == [(0, size)]:
                checked.add(name)  # its digest reads only bytes copied here
    plan = replace(plan, uri=uri)
    plan.check_files(stages={stage}, weight_files=checked)
    return plan


def weight_ranges(plan: Plan, stage: int) -> dict[str, list[tuple[int, int]]]:
    """Per weight file (as ``plan.weights.files`` names it), the ``(offset, length)`` ranges stage ``stage``'s ONNX
    files read (their external tensors, subgraphs included; the stage files must be in ``plan.root``)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for name, _ in plan.stages[stage].files():
        file = contained(plan.root, name, what=f"stage {stage} file")
        model = onnx.load(str(file), load_external_data=False)
        for tensor in iter_tensors(model.graph):
            if is_external(tensor):
                ref = external_ref(tensor)
                key = (Path(name).parent / ref.location).as_posix()
                if key not in plan.weights.files:
                    raise PlanError(f"stage {stage} file {name} reads weight file {key!r}, which plan.json does not "
                                    "list; re-run `onnxshard plan`")
                ranges.setdefault(key, []).append((ref.offset, ref.length))
    return ranges


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """What :func:`onnxshard.digests.sample_digest` reads of a weight file over ``FULL_CHECK_BYTES``; nothing of a
    smaller one (its digest is of every byte: a part of it is checked by its size, and by the stage file's sha256,
    which fixes the ranges read)."""
    if size <= FULL_CHECK_BYTES:
        return []
    return [(i * (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1), SAMPLE_BLOCK) for i in range(SAMPLE_BLOCKS)]


def merged(ranges: list[tuple[int, int]], gap: int = GAP) -> list[tuple[int, int]]:
    """``ranges`` sorted, those within ``gap`` bytes of each other joined."""
    out: list[list[int]] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(a, b) for a, b in out]


def _missing(want: list[tuple[int, int]], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``want`` (merged ranges) that ``have`` (merged, gap 0) does not cover."""
    out = []
    for offset, length in want:
        start, end = offset, offset + length
        for h_off, h_len in have:
            if h_off + h_len <= start or h_off >= end:
                continue
            if h_off > start:
                out.append((start, h_off - start))
            start = max(start, h_off + h_len)
            if start >= end:
                break
        if start < end:
            out.append((start, end - start))
    return out


def _fill(fs, root: str, local: Path, name: str, size: int | None, ranges) -> None:
    """Copy ``ranges`` of the remote ``root/name`` into the local sparse file of ``size`` bytes, skipping what an
    earlier copy (recorded beside it) already holds; ``ranges`` ``None``: the whole file, whatever its size."""
    target = contained(local, name, what="plan file")
    record = target.with_name(target.name + ".ranges.json")
    have = [tuple(r) for r in json.loads(record.read_text())] if record.is_file() and target.is_file() else []
    if ranges is not None:
        todo = _missing(merged(list(ranges)), merged(have, 0))
        if not todo:
            return  # all here: not even the remote file is opened
    source = f"{root}/{name}"
    try:
        remote = fs.open_input_file(source)
    except FileNotFoundError:
        raise PlanError(f"{source} is missing; upload the whole plan folder") from None
    with remote:
        if size is None:
            size = remote.size()
            todo = [(0, size)]
        elif remote.size() != size:
            raise PlanError(f"{source} is {remote.size()} bytes, the plan expects {size}; it changed after "
                            "planning: re-run `onnxshard plan`")
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if target.is_file() and target.stat().st_size == size else "w+b"
        with open(target, mode) as out:
            out.truncate(size)  # a sparse file: what is not copied takes no disk
            for offset, length in todo:
                for start in range(offset, offset + length, READ_BLOCK):
                    out.seek(start)
                    out.write(remote.read_at(min(READ_BLOCK, offset + length - start), start))
    if ranges is not None:
        _write_atomic(record, json.dumps(merged(have + todo, 0)).encode())


def _portable(plan: Plan, uri: str) -> None:
    if plan.weights.mode == "external":
        raise PlanError(f"plan {uri} reads its weights from {plan.weights.dir} on the machine that planned it; a "
                        "plan on shared or object storage must hold its weights: plan into a folder beside the "
                        "model (its weight files are linked) or with --copy-weights, then upload the plan folder")


def _open(uri: str):
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError or ValueError for bad URIs
        raise PlanError(f"cannot open plan {uri}: {e}") from None
    return fs, path.rstrip("/")


def _read(fs, path: str, uri: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise PlanError(f"{uri} is not a plan: {PLAN_FILE} is missing there; upload a plan folder made with "
                        "`onnxshard plan`") from None
    except OSError as e:
        raise PlanError(f"cannot read {path} of plan {uri}: {e}") from None


def _json(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise PlanError(f"{PLAN_FILE} is not JSON ({e}); upload a plan folder made with `onnxshard plan`") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@contextmanager
def _locked(path: Path):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

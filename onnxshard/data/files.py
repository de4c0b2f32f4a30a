"""The files of a batch job, without Ray: the input Parquet files (each with its row count from its footer), the
output file each one gets, and the manifest that records which inputs are done, so that a job killed mid-way
resumes where it stopped and writes every row exactly once.

Each input file becomes one output file (and, with rejected rows, one rejects file), written under a temporary
name and renamed when the last of its rows is in; only then is the input added to the manifest. A job killed at
any moment leaves whole output files, each listed in the manifest or redone (and replaced) on ``--resume``."""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from onnxshard.errors import InputError

MANIFEST = "_onnxshard_manifest.jsonl"
REJECTS = "_rejects"
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class InputFile:
    path: str  # on its filesystem, as Ray Data's ``path`` column names it (local: absolute; s3://b/k: b/k)
    rows: int
    size: int
    mtime_ns: int
    output: str  # the output file's name


def list_inputs(spec: str):
    """(the Parquet files of ``spec``, the ``pyarrow.fs`` filesystem they are on). ``spec``: a file, a folder
    (searched recursively, leaving out hidden and ``_`` names), or a local glob; a local path or any URI that
    ``pyarrow.fs`` opens (``file://``, ``s3://``, ``gs://``, ``hdfs://``). Sorted, each with its row count from its
    footer (no data is read)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if "://" in spec:
        try:
            fs, root = pafs.FileSystem.from_uri(spec)
        except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise InputError(f"--input {spec}: {e}") from None
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(spec)
    if "://" not in spec and any(c in spec for c in "*?["):
        infos = fs.get_file_info(sorted(os.path.abspath(p) for p in glob.glob(spec, recursive=True)))
        infos, base = [i for i in infos if i.is_file], os.path.abspath(_glob_root(spec))
    else:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"--input {spec}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            infos, base = fs.get_file_info(pafs.FileSelector(root, recursive=True)), root
            infos = [i for i in infos if i.is_file and i.path.endswith(".parquet") and not any(
                part.startswith((".", "_")) for part in os.path.relpath(i.path, root).split("/"))]
        else:
            infos, base = [info], os.path.dirname(root)
    if not infos:
        raise InputError(f"--input {spec}: no Parquet files there")
    found = []
    for info in sorted(infos, key=lambda i: i.path):
        try:
            with fs.open_input_file(info.path) as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - say which file, whatever pyarrow raised
            raise InputError(f"--input: {info.path} is not a readable Parquet file ({e})") from None
        name = os.path.relpath(info.path, base).replace("/", "__")
        found.append(InputFile(info.path, rows, info.size, info.mtime_ns or 0,
                               name if name.endswith(".parquet") else name + ".parquet"))
    return found, fs


def _glob_root(spec: str) -> str:
    """The folder above a glob's first wildcard."""
    head = spec[:min(spec.index(c) for c in "*?[" if c in spec)]
    return os.path.dirname(head) or "."


class Manifest:
    """``OUT/_onnxshard_manifest.jsonl``: a header line with the job's settings, then one line per finished input
    (its path, size, mtime, rows, output file, rejected rows). Appended and fsynced line by line."""

    def __init__(self, out: Path, settings: dict, *, resume: bool):
        check_output(out, resume)
        self.path = out / MANIFEST
        self.done: dict[str, dict] = {}
        if self.path.exists():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if not lines or lines[0].get("settings") != settings:
                before = lines[0].get("settings") if lines else None
                diff = sorted(k for k in set(settings) | set(before or {}) if (before or {}).get(k) != settings.get(k))
                raise InputError(f"--resume: the job in {out} ran with other settings ({', '.join(diff)} differ: "
                                 f"{ {k: (before or {}).get(k) for k in diff} } then, { {k: settings.get(k) for k in diff} } "
                                 "now); rerun it with the same ones or give a new folder")
            self.done = {line["path"]: line for line in lines[1:]}
        else:
            out.mkdir(parents=False, exist_ok=True)
            self._append({"settings": settings})

    def todo(self, inputs: list[InputFile]) -> list[InputFile]:
        """The inputs not done yet; refuses a finished input that has changed since."""
        left = []
        for f in inputs:
            done = self.done.get(f.path)
            if done is None:
                left.append(f)
            elif (done["size"], done["mtime_ns"]) != (f.size, f.mtime_ns):
                raise InputError(f"--resume: {f.path} changed after it was processed (size or time differ); give a "
                                 "new --output folder to process the data again")
        return left

    def finish(self, f: InputFile, rejected: int) -> None:
        entry = {**asdict(f), "rejected": rejected}
        self._append(entry)
        self.done[f.path] = entry

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def check_output(out: Path, resume: bool) -> None:
    """Refuse an output folder this job may not write to: one with other files, or an earlier job's without
    ``resume``."""
    if (out / MANIFEST).exists():
        if not resume:
            raise InputError(f"--output {out} holds the manifest of an earlier job; pass --resume to finish it, or "
                             "give a new folder")
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"--output {out} exists and is not an empty folder; give a new folder"
                         + (" (--resume needs the folder of an earlier onnxshard batch job)" if resume else ""))


def clear_partial(out: Path) -> int:
    """Remove the temporary files a killed job left: only names :func:`temporary` makes (``.NAME.<8 hex>.tmp``),
    in ``out`` and its rejects folder; returns how many."""
    made = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")
    stale = [p for folder in (out, out / REJECTS) if folder.is_dir() for p in folder.iterdir()
             if p.is_file() and made.match(p.name)]
    for p in stale:
        p.unlink()
    return len(stale)


def publish(tmp: Path, final: Path) -> None:
    """Rename a written temporary file into place, durably: its bytes reach the disk before the rename, and the
    rename before the caller goes on (to the manifest)."""
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, final)
    _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary(final: Path) -> Path:
    """A temporary name beside ``final`` that no user file has (hidden, random, ``.tmp``)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")

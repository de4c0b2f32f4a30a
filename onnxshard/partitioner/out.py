"""The plan folder being written: refused before any work unless replacing it can only remove what onnxshard
wrote there, created with the usual permissions, and swapped in whole by rename."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

from onnxshard.errors import PlanError
from onnxshard.plans import Plan, read_plan_json


def check_out(out: str | os.PathLike, keep: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse a plan folder ``out`` whose replacement could remove anything onnxshard did not write: a file, a
    folder holding (or being) the working folder or one of the ``keep`` paths (the model), a folder that is not
    an onnxshard plan, or a plan folder holding anything its own ``plan.json`` does not list."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise PlanError(f"--out {out} is a file; give a new folder (or an old plan folder) for the plan")
    for path in [Path.cwd(), *map(Path, keep)]:
        real = Path(os.path.realpath(path))
        if real == Path(os.path.realpath(out)) or Path(os.path.realpath(out)) in real.parents:
            what = "the current folder" if path == Path.cwd() else str(path)
            raise PlanError(f"--out {out} holds {what}; write the plan to a new folder elsewhere")
    if not out.is_dir():
        _check_can_create(out)
        return
    if not any(out.iterdir()):
        return
    extra = foreign_files(out)
    if extra is None:
        raise PlanError(f"--out {out} exists, is not empty and is not a plan folder of onnxshard; choose a new or "
                        "empty folder")
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise PlanError(f"--out {out} is a plan folder that also holds files onnxshard did not write ({shown}); "
                        "move them or choose another folder")


def _check_can_create(out: Path) -> None:
    """Refuse at once (before any planning) a folder that cannot be made: its first existing parent must take a
    new folder (the only reliable test, with permissions, read-only mounts and /proc)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:
        probe = parent / f".onnxshard-probe-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise PlanError(f"--out {out}: cannot create a folder in {parent} ({e.strerror or e})") from None


def replace_with(new: Path, out: Path) -> None:
    """Put the finished plan folder ``new`` at ``out``; an old plan there (checked again: nothing else may have
    appeared in it meanwhile) is moved aside first and removed only once the new one is in place."""
    if not out.exists():
        new.rename(out)
        return
    check_out(out)
    old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def foreign_files(root: str | os.PathLike) -> list[str] | None:
    """What in folder ``root`` onnxshard did not write: ``None`` if it is not an onnxshard plan folder at all,
    else the entries (relative paths) that its own ``plan.json`` does not list (empty: only plan files)."""
    root = Path(root)
    try:
        listed = Plan.from_json(read_plan_json(root), root).listing()
    except PlanError:
        return None
    folders = {p.as_posix() for name in listed for p in Path(name).parents if p != Path(".")}
    extra = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).relative_to(root)
        for d in list(dirnames):
            rel = (here / d).as_posix()
            if rel not in folders or os.path.islink(os.path.join(dirpath, d)):
                extra.append(rel + "/")
                dirnames.remove(d)
        extra += [(here / f).as_posix() for f in filenames if (here / f).as_posix() not in listed]
    return sorted(extra)

"""Files onnxshard reads and writes for its users: checked before any work, written whole or not at all.

An output path is checked before the work that fills it starts (a folder, a missing folder or one this process
cannot write in is refused at once), and written through a temporary file in the same folder that is renamed over
the target, so an interrupted write leaves the old file as it was. ``.npz`` inputs are read with their array
headers checked against the bytes the file holds, so a corrupt or hostile header is an error, not a 400 GiB
allocation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxshard.errors import InputError

NPY_MAGIC = b"\x93NUMPY"


def check_writable(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a Path, or :class:`InputError` unless a file can be written there now. ``suffixes``: the
    endings allowed (the first is suggested)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{what} {path} must end in {' or '.join(suffixes)} (e.g. {path.with_suffix(suffixes[0])})")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{what} {path}: folder {folder} does not exist; create it first")
    try:  # the only reliable test of a folder (permissions, read-only mounts, /proc) is to write in it
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """A file object whose content replaces ``path`` only once the block ends without error (temporary file in
    the same folder, flushed to disk, then renamed over ``path``); on any error or interrupt ``path`` is
    untouched and the temporary file removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting it to read it would, for an
    instant, give files other threads create no protection)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to exactly ``path`` (numpy.savez would add ``.npz`` to another name), atomically."""
    with atomic_writer(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def load_npz(path: str | os.PathLike, what: str = "inputs") -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file (``numpy.savez``), or :class:`InputError` naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give an .npz file written with numpy.savez")
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if not head:
        raise InputError(f"{what} file {path} is empty; write it with numpy.savez(path, name=array, ...)")
    if head == NPY_MAGIC:
        raise InputError(f"{what} file {path} is a single .npy array without a name; save the {what} with "
                         "numpy.savez(path, name=array, ...) so each array is named after its model tensor")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{what} file {path} is not an .npz file (truncated, or another format); write it with "
                         "numpy.savez")
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                _check_member(z, info, path)
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except InputError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, MemoryError) as e:
        raise InputError(f"cannot read {what} from {path} ({type(e).__name__}: {e}); write them with "
                         "numpy.savez") from None


def _check_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    """Refuse a member whose array header declares more bytes than the member holds (truncated or hostile)."""
    name = info.filename.removesuffix(".npy")
    with z.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
            header = member.tell() if member.seekable() else 0
        except ValueError as e:
            raise InputError(f"array {name!r} in {path} has no valid .npy header ({e})") from None
    if dtype.hasobject:
        raise InputError(f"array {name!r} in {path} holds Python objects (dtype {dtype}); onnxshard reads only "
                         "numeric, bool and fixed-width string arrays")
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if declared > info.file_size - header:
        raise InputError(f"array {name!r} in {path} declares shape {list(shape)} ({declared} bytes) but the file "
                         f"holds {info.file_size - header}: it is truncated or corrupt")

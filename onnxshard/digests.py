"""Digests of the files a plan uses: of every byte, or of a sample cheap enough to check at every load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Weight files up to this size are hashed whole when a plan is saved and whenever it is loaded; larger ones by a
# sample of SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes spread over the file (plus the size), so planning stays lazy
# (1 MiB read per large file). `check_files(full=True)` (`onnxshard verify --weights`) hashes every byte against
# the full digests (recorded for large files by `plan --hash-weights`).
FULL_CHECK_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK = 256, 4096


def sample_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's size and of ``SAMPLE_BLOCKS`` blocks spread evenly over it (of every byte, for a file up
    to ``FULL_CHECK_BYTES``): cheap to check at every load, whatever the weights weigh."""
    size = os.path.getsize(path)
    if size <= FULL_CHECK_BYTES:
        return sha256_file(Path(path))
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

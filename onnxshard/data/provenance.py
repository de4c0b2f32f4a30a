"""Where a row came from, for messages and the rejects file: its input file (Ray Data's ``path`` column, from
``read_parquet(include_paths=True)``) and its place in that file, recovered from Ray Data's ``row_hash`` column
(``include_row_hash=True``). No Ray."""

from __future__ import annotations

import hashlib

import numpy as np

PATH = "path"  # the columns read_parquet adds
ROW_HASH = "row_hash"
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """The splitmix64 finalizer Ray Data hashes ``seed(path) + row`` with."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _unmix(x: int) -> int:
    """The inverse of :func:`_mix` (each step is a bijection of 64-bit words)."""
    x ^= (x >> 31) ^ (x >> 62)
    x = (x * 0x319642B2D24D8EC3) & _M64
    x ^= (x >> 27) ^ (x >> 54)
    x = (x * 0x96DE1B173F119089) & _M64
    return x ^ (x >> 30) ^ (x >> 60)


def _seed(path: str) -> int:
    return int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], "little")


def row_in_file(path: str, row_hash: int) -> int | None:
    """The row's place in its file, or ``None`` when the hash is not the one Ray Data gives that place (another
    Ray version may hash otherwise: then the row is named by its ``keep`` columns only)."""
    row = (_unmix(int(row_hash)) - _seed(path)) & _M64
    return row if row < (1 << 48) and _mix((_seed(path) + row) & _M64) == int(row_hash) else None


def rows_in_files(batch: dict[str, np.ndarray], rows) -> dict[int, int]:
    """``{i: place in its file}`` for the batch rows ``rows`` (those that can be placed)."""
    if PATH not in batch or ROW_HASH not in batch:
        return {}
    found = {int(i): row_in_file(str(batch[PATH][i]), int(batch[ROW_HASH][i])) for i in rows}
    return {i: r for i, r in found.items() if r is not None}


def name_row(batch: dict[str, np.ndarray], i: int, keep_label: str) -> str:
    """``row 17 of file /data/a.parquet (id=5)``, or ``row 3 of the batch (id=5)`` without a path column."""
    if PATH not in batch:
        return f"row {i} of the batch{keep_label}"
    row = rows_in_files(batch, [i]).get(i)
    place = f"row {row}" if row is not None else "a row"
    return f"{place} of file {batch[PATH][i]}{keep_label}"

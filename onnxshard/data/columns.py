"""Ray Data batches to a model's feeds and back, without Ray: which column feeds which input (by default the
same name), tensor columns (Ray's tensor extension types arrive as n-d arrays), list columns (object arrays of
rows, stacked), scalar columns, and outputs written as columns beside the pass-through ones (an id, say), so each
output row joins back to its input row. Every refusal names the column and, where one row is at fault, the row."""

from __future__ import annotations

from collections import Counter

import numpy as np

from onnxshard import dtypes
from onnxshard.errors import InputError, RowError
from onnxshard.plans import TensorSpec


def column_map(inputs: tuple[TensorSpec, ...], columns: dict[str, str] | None) -> dict[str, str]:
    """model input -> column; ``columns`` names the inputs whose column is not called like them."""
    columns = dict(columns or {})
    names = {t.name for t in inputs}
    unknown = sorted(set(columns) - names)
    if unknown:
        raise InputError(f"--columns names unknown model input(s) {unknown}; the model takes {sorted(names)}")
    return {t.name: columns.get(t.name, t.name) for t in inputs}


def row_outputs(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """The outputs written as columns: ``wanted``, or every output whose first dim is the inputs' batch dim (the
    symbolic first dim of the first input)."""
    names = [t.name for t in outputs]
    batch = next((t.shape[0] for t in inputs if t.shape and isinstance(t.shape[0], str)), None)
    per_row = [t.name for t in outputs if batch is not None and t.shape and t.shape[0] == batch]
    if wanted is None:
        if not per_row:
            raise InputError(f"no model output has one row per input row (batch axis 0): {names}")
        return tuple(per_row)
    bad = [n for n in wanted if n not in per_row]
    if bad:
        raise InputError(f"output(s) {bad} cannot be columns: " + "; ".join(
            f"{n!r} is not a model output ({names})" if n not in names else f"{n!r} has no batch axis 0"
            for n in bad))
    return tuple(wanted)


def to_feeds(batch: dict[str, np.ndarray], inputs: tuple[TensorSpec, ...], mapping: dict[str, str],
             where: str = "batch", keep: tuple[str, ...] = (), name_row=None) -> dict[str, np.ndarray]:
    """The feeds of one Ray Data batch (numpy format). A bad row is named by ``name_row(i)`` (default: its place
    in the batch and its ``keep`` columns, an id that finds it in the data) and raises :class:`RowError`."""
    name_row = name_row or (lambda i: f"row {i}" + keep_label(batch, keep, i))
    feeds = {}
    for spec in inputs:
        column = mapping[spec.name]
        if column not in batch:
            raise InputError(f"{where}: no column {column!r} for model input {spec.name!r}; columns are "
                             f"{sorted(batch)} (map one with --columns {spec.name}=COLUMN)")
        feeds[spec.name] = _tensor(batch[column], spec, column, where, name_row)
    return feeds


def good_rows(batch: dict[str, np.ndarray], inputs: tuple[TensorSpec, ...], mapping: dict[str, str],
              where: str = "batch", keep: tuple[str, ...] = (), name_row=None
              ) -> tuple[np.ndarray, dict[str, np.ndarray] | None, dict[int, str]]:
    """``to_feeds`` that sets bad rows aside: (the places of the good rows, their feeds or ``None`` when no row is
    good, the reason for each bad row). A fault of a whole column (a dtype the input cannot take) fails every
    row."""
    name_row = name_row or (lambda i: f"row {i}" + keep_label(batch, keep, i))
    good = np.arange(len(next(iter(batch.values()), ())))
    reasons: dict[int, str] = {}
    while len(good):
        part = {k: v[good] for k, v in batch.items()}
        try:
            return good, to_feeds(part, inputs, mapping, where, keep, lambda i, g=good: name_row(int(g[i]))), reasons
        except RowError as e:
            reasons[int(good[e.row])] = str(e)
            good = np.delete(good, e.row)
        except InputError as e:  # each row's reason names it, as a RowError's does
            reasons.update((int(i), f"{name_row(int(i))}: {e}") for i in good)
            good = good[:0]
    return good, None, reasons


def keep_label(batch: dict[str, np.ndarray], keep: tuple[str, ...], i: int) -> str:
    """`` (id=5)``: row ``i``'s ``keep`` columns, which find it in the data."""
    return "".join(f" ({k}={_plain(batch[k][i])!r})" for k in keep if k in batch)


def _tensor(values: np.ndarray, spec: TensorSpec, column: str, where: str, name_row) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == object and spec.dtype != "string":  # a list column: one array per row
        rows = []
        for i, v in enumerate(values):
            try:
                rows.append(_dense(v))
            except ValueError:
                raise RowError(f"{where}: column {column!r} {name_row(i)} holds nested lists of different lengths; "
                               "a row must be a rectangular tensor", i) from None
        shapes = {r.shape for r in rows}
        if len(shapes) > 1:  # blame the row that differs from the model's row shape, else from most rows
            fixed = spec.shape is not None and all(isinstance(d, int) for d in spec.shape[1:])
            want = tuple(spec.shape[1:]) if fixed else Counter(r.shape for r in rows).most_common(1)[0][0]
            bad = next(i for i, r in enumerate(rows) if r.shape != want)
            raise RowError(f"{where}: column {column!r} {name_row(bad)} has shape {list(rows[bad].shape)}, the other "
                           f"rows {list(want)}; the rows of a batch must agree", bad)
        values = np.stack(rows) if rows else values
    want = dtypes.numpy_dtype(spec.dtype)
    if values.dtype != want:
        if spec.dtype == "string" or not np.can_cast(values.dtype, want, "same_kind"):
            raise InputError(f"{where}: column {column!r} holds {values.dtype}, which model input {spec.name!r} "
                             f"({spec.dtype}) cannot take")
        values = values.astype(want)
    if spec.shape is not None:
        if values.ndim != len(spec.shape):
            raise InputError(f"{where}: column {column!r} gives rows of shape {list(values.shape[1:])}, but model "
                             f"input {spec.name!r} takes {list(spec.shape[1:])} per row")
        for axis, (got, dim) in enumerate(zip(values.shape, spec.shape)):
            if isinstance(dim, int) and got != dim:
                raise InputError(f"{where}: column {column!r} gives rows of shape {list(values.shape[1:])}, but "
                                 f"model input {spec.name!r} takes {list(spec.shape[1:])} per row (dim {axis})")
    return values


def _dense(cell) -> np.ndarray:
    """A list cell as one n-d array: Ray Data gives a nested list column as object arrays of arrays, stacked here
    level by level (``ValueError`` when the inner lists differ in length)."""
    cell = np.asarray(cell)
    if cell.dtype != object or not cell.size:
        return cell
    if not isinstance(cell.flat[0], (np.ndarray, list)):  # Python numbers in an object array
        return np.array(cell.tolist())
    parts = [_dense(v) for v in cell]
    if len({p.shape for p in parts}) > 1:
        raise ValueError("ragged")
    return np.stack(parts)


def to_columns(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray], keep: tuple[str, ...],
               where: str = "batch") -> dict[str, np.ndarray]:
    """The output batch: the kept input columns, then one column per model output (n-d arrays become tensor
    columns)."""
    missing = [k for k in keep if k not in batch]
    if missing:
        raise InputError(f"{where}: --keep column(s) {missing} are not in the data; columns are {sorted(batch)}")
    clash = [k for k in keep if k in outputs]
    if clash:
        raise InputError(f"--keep column(s) {clash} have the names of model outputs; rename them")
    return {**{k: batch[k] for k in keep}, **outputs}


def _plain(value):
    """A numpy scalar as the Python value it holds (``5``, not ``np.int64(5)``), for messages."""
    return value.item() if isinstance(value, np.generic) else value

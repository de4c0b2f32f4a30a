"""The Arrow tensor codec: a micro-batch is a one-row ``pa.RecordBatch`` with one column per tensor.

Each column is a ``large_list`` whose single row holds the tensor's elements flattened in C order; the field's
metadata carries the ONNX element type and the shape. Building a column wraps the numpy buffer (no copy for a
contiguous numeric array) and decoding returns a numpy view of the Arrow buffer (no copy). Types Arrow
cannot hold as ONNX means them travel as views: bool as uint8, bfloat16 as uint16 (its bits); strings become a
``large_string`` column (a copy: numpy object arrays hold Python objects).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from onnxshard import dtypes
from onnxshard.errors import InputError

ONNX_TYPE = b"onnx_type"
SHAPE = b"shape"

# How each ONNX type is stored in Arrow (the numpy dtype of the bytes, and the Arrow type of the values).
_STORAGE = {
    "float32": pa.float32(), "float64": pa.float64(), "float16": pa.float16(), "bfloat16": pa.uint16(),
    "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "uint8": pa.uint8(),
    "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(), "bool": pa.uint8(),
}


def tensor_to_column(name: str, value: np.ndarray, onnx_type: str | None = None) -> tuple[pa.Field, pa.Array]:
    """One tensor as a field and a one-row array. ``onnx_type`` says what a uint16 array holds (``bfloat16``)."""
    value = np.asarray(value)
    onnx_type = onnx_type or dtypes.from_numpy(value.dtype)
    metadata = {ONNX_TYPE: onnx_type.encode(), SHAPE: json.dumps(list(value.shape)).encode()}
    if onnx_type == "string":
        flat = _strings([str(v).encode() for v in value.reshape(-1)])
    else:
        storage = _STORAGE[onnx_type]
        flat_np = np.ascontiguousarray(value).reshape(-1)  # copies only when the input is not C-contiguous
        if onnx_type == "bool":
            flat_np = flat_np.view(np.uint8)
        flat = pa.Array.from_buffers(storage, flat_np.size, [None, pa.py_buffer(flat_np)])
    column = pa.LargeListArray.from_arrays(_int64([0, len(flat)]), flat)
    return pa.field(name, column.type, nullable=False, metadata=metadata), column


# Arrays are built from buffers: pa.array() imports pandas the first time it runs (0.2-1 s and tens of MB in every
# stage worker, paid by its first micro-batch).
def _int64(values: list[int]) -> pa.Array:
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(np.array(values, np.int64))])


def _strings(encoded: list[bytes]) -> pa.Array:
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string(), len(encoded),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def column_to_tensor(field: pa.Field, column: pa.Array, writable: bool = False) -> np.ndarray:
    """The numpy tensor a column holds: a view of the Arrow buffer (strings: an object array). The view is
    read-only unless ``writable`` and the memory underneath is a mutable buffer (see :func:`decode`)."""
    meta = field.metadata or {}
    if ONNX_TYPE not in meta or SHAPE not in meta:
        raise InputError(f"Arrow column {field.name!r} is not an onnxshard tensor column (no onnx_type/shape metadata)")
    onnx_type = meta[ONNX_TYPE].decode()
    shape = tuple(json.loads(meta[SHAPE]))
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            raise InputError(f"Arrow column {field.name!r} has {column.num_chunks} chunks; a tensor needs one row")
        column = column.chunk(0)
    start, end = column.offsets[0].as_py(), column.offsets[1].as_py()  # one row (value_lengths() would import
    values = column.values.slice(start, end - start)                   # pyarrow.compute: ~0.2 s on first use)
    if onnx_type == "string":
        return np.array(values.to_pylist(), dtype=object).reshape(shape)
    np_dtype = dtypes.numpy_dtype(onnx_type) if onnx_type != "bool" else np.dtype(np.uint8)
    data = values.buffers()[1]
    if data is None or len(values) == 0:
        return np.empty(shape, dtype=np.bool_ if onnx_type == "bool" else np_dtype)
    offset = values.offset * np_dtype.itemsize
    if writable:
        data, offset = _mutable_root(data, offset)
    array = np.frombuffer(data, dtype=np_dtype, count=len(values), offset=offset)
    if onnx_type == "bool":
        array = array.view(np.bool_)
    return array.reshape(shape)


def encode(tensors: dict[str, np.ndarray], onnx_types: dict[str, str] | None = None) -> pa.RecordBatch:
    """A micro-batch from named tensors."""
    fields, columns = [], []
    for name, value in tensors.items():
        f, c = tensor_to_column(name, value, (onnx_types or {}).get(name))
        fields.append(f)
        columns.append(c)
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


def decode(batch: pa.RecordBatch, names: list[str] | None = None, *, writable: bool = False) -> dict[str, np.ndarray]:
    """Named tensors from a micro-batch (all columns, or just ``names``). ``writable``: the batch's memory is
    the caller's alone (a frame received into a buffer of its own, see ``frames.recv_frame``), so the tensors may
    be writable views of it, which the caller can hand on without copying; elsewhere they stay read-only."""
    schema = batch.schema
    wanted = names if names is not None else schema.names
    out = {}
    for name in wanted:
        i = schema.get_field_index(name)
        if i < 0:
            raise InputError(f"micro-batch has no tensor {name!r}; it holds {schema.names}")
        out[name] = column_to_tensor(schema.field(i), batch.column(i), writable)
    return out


def _mutable_root(buffer: pa.Buffer, offset: int) -> tuple[pa.Buffer, int]:
    """The buffer that ``buffer`` slices (Arrow marks slices read-only) and the offset in it, if that is mutable."""
    root = buffer
    while root.parent is not None:
        root = root.parent
    if not root.is_mutable:
        return buffer, offset
    return root, offset + buffer.address - root.address


def select(batch: pa.RecordBatch, names: list[str]) -> list[tuple[pa.Field, pa.Array]]:
    """Columns of ``batch`` passed on unchanged (zero copy)."""
    return [(batch.schema.field(n), batch.column(batch.schema.get_field_index(n))) for n in names]


def assemble(columns: list[tuple[pa.Field, pa.Array]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([c for _, c in columns], schema=pa.schema([f for f, _ in columns]))


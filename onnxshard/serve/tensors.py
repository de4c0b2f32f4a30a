"""Tensors in the KServe v2 / Open Inference Protocol: its datatype names, and numpy arrays to and from JSON data
and raw little-endian bytes (the binary tensor data extension over HTTP, ``raw_*_contents`` over gRPC).

Plain functions, no web framework, no Ray: every check names the tensor and raises :class:`ProtocolError` with
the HTTP status the protocol gives (gRPC maps it, see ``grpc_status``)."""

from __future__ import annotations

import math
import struct

import numpy as np

from onnxshard import dtypes
from onnxshard.errors import OnnxShardError
from onnxshard.plans import TensorSpec

# KServe v2 datatype <-> onnxshard dtype name (dtypes.py). BF16 travels as its 16 bits (numpy has no bfloat16).
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BF16": "bfloat16", "BYTES": "string"}
_BY_DTYPE = {name: datatype for datatype, name in DATATYPES.items()}
MAX_ELEMENTS = 2**31  # a shape past this is refused before anything is allocated


class ProtocolError(OnnxShardError):
    """A request the protocol refuses: ``status`` is the HTTP status to answer with, the message names the
    tensor or field at fault."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(spec: TensorSpec) -> str:
    return _BY_DTYPE[spec.dtype]


def shape_of(spec: TensorSpec) -> list[int]:
    """The protocol's shape: fixed dims as they are, -1 for variable ones (``None`` shape: rank unknown)."""
    return [d if isinstance(d, int) else -1 for d in (spec.shape or ())]


def tensor_metadata(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": datatype_of(spec), "shape": shape_of(spec)}


def check_header(spec: TensorSpec, datatype, shape) -> tuple[int, ...]:
    """The shape of an input tensor as a tuple, checked against the model's declaration of it."""
    name = spec.name
    if datatype != datatype_of(spec):
        raise ProtocolError(f"input {name!r} has datatype {datatype!r}, but the model takes {datatype_of(spec)}")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of whole numbers (got {shape!r})")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {list(shape)} has a negative dim")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} holds more than {MAX_ELEMENTS} elements")
    if spec.shape is not None:
        if len(shape) != len(spec.shape):
            raise ProtocolError(f"input {name!r} has shape {list(shape)}, but the model takes rank "
                                f"{len(spec.shape)} ({shape_of(spec)})")
        for axis, (got, want) in enumerate(zip(shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise ProtocolError(f"input {name!r} has shape {list(shape)}, but the model takes "
                                    f"{shape_of(spec)} (dim {axis} must be {want})")
    return tuple(shape)


def from_data(spec: TensorSpec, shape: tuple[int, ...], data) -> np.ndarray:
    """An input from JSON ``data`` (flat or nested, row-major)."""
    flat = _flatten(data, spec.name)
    count = math.prod(shape)
    if len(flat) != count:
        raise ProtocolError(f"input {spec.name!r}: shape {list(shape)} holds {count} elements, but data has "
                            f"{len(flat)}")
    if spec.dtype == "string":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {spec.name!r}: BYTES data must be strings")
        return np.array(flat, dtype=object).reshape(shape)
    want = (bool,) if spec.dtype == "bool" else (int, float)
    bad = next((v for v in flat if not isinstance(v, want) or (spec.dtype != "bool" and isinstance(v, bool))), None)
    if bad is not None or (spec.dtype not in ("float16", "float32", "float64", "bool")
                           and any(isinstance(v, float) for v in flat)):
        bad = bad if bad is not None else next(v for v in flat if isinstance(v, float))
        kind = "true/false" if spec.dtype == "bool" else "whole numbers" if "int" in spec.dtype else "numbers"
        raise ProtocolError(f"input {spec.name!r}: {datatype_of(spec)} data must be {kind} (got {bad!r})")
    try:
        return np.array(flat, dtype=dtypes.numpy_dtype(spec.dtype)).reshape(shape)
    except (OverflowError, ValueError, TypeError) as e:
        raise ProtocolError(f"input {spec.name!r}: data does not fit {datatype_of(spec)} ({e})") from None


def _flatten(data, name: str) -> list:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: data must be a list (got {type(data).__name__})")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 64:
                    raise ProtocolError(f"input {name!r}: data is nested too deep")
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def from_bytes(spec: TensorSpec, shape: tuple[int, ...], raw: bytes | memoryview) -> np.ndarray:
    """An input from raw little-endian row-major bytes (BYTES: each element a 4-byte length, then its bytes)."""
    count = math.prod(shape)
    if spec.dtype == "string":
        values = _unpack_strings(raw, spec.name)
        if len(values) != count:
            raise ProtocolError(f"input {spec.name!r}: shape {list(shape)} holds {count} elements, but its "
                                f"binary data has {len(values)}")
        return np.array(values, dtype=object).reshape(shape)
    dtype = dtypes.numpy_dtype(spec.dtype)
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"input {spec.name!r}: shape {list(shape)} of {datatype_of(spec)} needs "
                            f"{count * dtype.itemsize} bytes, but its binary data has {len(raw)}")
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
    if spec.dtype == "bool" and array.size and array.view(np.uint8).max() > 1:
        raise ProtocolError(f"input {spec.name!r}: BOOL bytes must be 0 or 1")
    return array.astype(dtype)  # native byte order, writable, not a view of the request body


def _unpack_strings(raw, name: str) -> list[str]:
    raw = memoryview(raw)
    values, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element of {size} bytes runs past the end of its data")
        try:
            values.append(bytes(raw[at:at + size]).decode())
        except UnicodeDecodeError:
            raise ProtocolError(f"input {name!r}: BYTES elements must be UTF-8 text (ONNX strings)") from None
        at += size
    return values


def to_data(array: np.ndarray) -> list:
    """An output as the protocol's flat JSON list."""
    flat = array.reshape(-1)
    if flat.dtype == object:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def to_bytes(array: np.ndarray) -> bytes:
    """An output as raw little-endian row-major bytes."""
    if array.dtype == object:
        parts = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


"""ONNX element types, by the names onnxshard writes in plans and Arrow metadata."""

import numpy as np
from onnx import TensorProto

# name -> (ONNX elem type, numpy dtype as held in memory, ORT type string)
_TYPES = {
    "float32": (TensorProto.FLOAT, np.dtype(np.float32), "tensor(float)"),
    "float64": (TensorProto.DOUBLE, np.dtype(np.float64), "tensor(double)"),
    "float16": (TensorProto.FLOAT16, np.dtype(np.float16), "tensor(float16)"),
    # numpy has no bfloat16: its bits travel as uint16.
    "bfloat16": (TensorProto.BFLOAT16, np.dtype(np.uint16), "tensor(bfloat16)"),
    "int8": (TensorProto.INT8, np.dtype(np.int8), "tensor(int8)"),
    "int16": (TensorProto.INT16, np.dtype(np.int16), "tensor(int16)"),
    "int32": (TensorProto.INT32, np.dtype(np.int32), "tensor(int32)"),
    "int64": (TensorProto.INT64, np.dtype(np.int64), "tensor(int64)"),
    "uint8": (TensorProto.UINT8, np.dtype(np.uint8), "tensor(uint8)"),
    "uint16": (TensorProto.UINT16, np.dtype(np.uint16), "tensor(uint16)"),
    "uint32": (TensorProto.UINT32, np.dtype(np.uint32), "tensor(uint32)"),
    "uint64": (TensorProto.UINT64, np.dtype(np.uint64), "tensor(uint64)"),
    "bool": (TensorProto.BOOL, np.dtype(np.bool_), "tensor(bool)"),
    "string": (TensorProto.STRING, np.dtype(object), "tensor(string)"),
}
_BY_ELEM = {elem: name for name, (elem, _, _) in _TYPES.items()}
_BY_ORT = {ort: name for name, (_, _, ort) in _TYPES.items()}
# numpy -> ONNX: bfloat16 shares uint16's storage, so uint16 arrays read as uint16.
_BY_NUMPY = {np_dtype: name for name, (_, np_dtype, _) in _TYPES.items() if name != "bfloat16"}

NAMES = tuple(_TYPES)


def from_elem_type(elem_type: int) -> str:
    try:
        return _BY_ELEM[elem_type]
    except KeyError:
        raise ValueError(f"ONNX element type {TensorProto.DataType.Name(elem_type)} is not supported") from None


def to_elem_type(name: str) -> int:
    return _TYPES[name][0]


def numpy_dtype(name: str) -> np.dtype:
    return _TYPES[name][1]


def from_ort(ort_type: str) -> str:
    try:
        return _BY_ORT[ort_type]
    except KeyError:
        raise ValueError(f"ONNX Runtime type {ort_type} is not supported") from None


def from_numpy(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "U" or dtype.kind == "S":
        return "string"
    try:
        return _BY_NUMPY[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no ONNX tensor type") from None


def itemsize(name: str) -> int:
    """Bytes per element (strings count 8, a pointer's worth, for cost estimates)."""
    return 8 if name == "string" else _TYPES[name][1].itemsize

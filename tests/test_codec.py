"""The Arrow tensor codec round-trips every ONNX tensor type and shape, zero-copy where Arrow allows."""

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxshard import dtypes
from onnxshard.errors import InputError
from onnxshard.runtime import arrow

NUMERIC = [n for n in dtypes.NAMES if n not in ("string", "bfloat16")]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(NUMERIC), shape=shapes, data=st.data())
def test_numeric_round_trip(name, shape, data):
    value = data.draw(hnp.arrays(dtypes.numpy_dtype(name), shape))
    back = arrow.decode(arrow.encode({"t": value}))["t"]
    assert back.dtype == value.dtype and back.shape == value.shape
    np.testing.assert_array_equal(back, value)


@settings(max_examples=50, deadline=None)
@given(shape=shapes, data=st.data())
def test_bfloat16_bits_and_strings_round_trip(shape, data):
    bits = data.draw(hnp.arrays(np.uint16, shape))
    strings = data.draw(hnp.arrays(object, shape, elements=st.text(max_size=5)))
    batch = arrow.encode({"b": bits, "s": strings}, {"b": "bfloat16"})
    assert batch.schema.field("b").metadata[b"onnx_type"] == b"bfloat16"
    back = arrow.decode(pickle.loads(pickle.dumps(batch, protocol=5)))
    np.testing.assert_array_equal(back["b"], bits)
    assert back["s"].dtype == object and back["s"].shape == shape and back["s"].tolist() == strings.tolist()


@settings(max_examples=50, deadline=None)
@given(value=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6)))
def test_non_contiguous_input_is_made_contiguous(value):
    view = value.T  # Fortran-ordered view
    np.testing.assert_array_equal(arrow.decode(arrow.encode({"t": view}))["t"], view)
    if value.ndim and value.shape[0] > 1:
        step = value[::2]
        np.testing.assert_array_equal(arrow.decode(arrow.encode({"t": step}))["t"], step)


def test_contiguous_numeric_tensors_are_not_copied():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    flags = np.zeros(5, dtype=bool)
    batch = arrow.encode({"x": x, "f": flags})
    back = arrow.decode(batch)
    assert np.shares_memory(back["x"], x) and np.shares_memory(back["f"], flags)


def test_bool_zero_d_and_empty_tensors():
    tensors = {"b": np.array([[True, False]]), "scalar": np.array(3.5, np.float64), "empty": np.zeros((0, 4), np.int8),
               "s0": np.array("x", dtype=object)}
    back = arrow.decode(arrow.encode(tensors))
    for name, value in tensors.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)


def test_passing_columns_on_is_zero_copy():
    batch = arrow.encode({"a": np.ones(1000, np.float32), "b": np.zeros(3, np.int64)})
    out = arrow.assemble(arrow.select(batch, ["a"]))
    assert out.column(0).buffers()[-1].address == batch.column(0).buffers()[-1].address


def test_columns_without_tensor_metadata_are_refused():
    batch = pa.RecordBatch.from_arrays([pa.array([1, 2])], names=["plain"])
    with pytest.raises(InputError, match="not an onnxshard tensor column"):
        arrow.decode(batch)
    with pytest.raises(InputError, match="has no tensor 'missing'"):
        arrow.decode(arrow.encode({"a": np.ones(2)}), ["missing"])


def test_the_codec_imports_neither_pandas_nor_pyarrow_compute():
    """A stage worker's first micro-batch used to import both (pa.array() pulls in pandas, value_lengths()
    pyarrow.compute): about 1 s of its first request, and pandas' memory in every worker."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from onnxshard.runtime import arrow; "
            "t = {'x': np.ones((2, 3), np.float32), 's': np.array(['a', 'bc'], dtype=object), "
            "'b': np.array([True, False]), 'e': np.zeros((0, 2), np.int64)}; "
            "out = arrow.decode(arrow.encode(t)); assert all((out[k] == t[k]).all() for k in t); "
            "print(sorted(m for m in ('pandas', 'pyarrow.compute') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

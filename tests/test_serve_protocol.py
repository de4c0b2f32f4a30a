"""The KServe v2 protocol layer without Ray or a server: tensors to and from JSON and binary data, each bad request
refused with the right status and a message naming the tensor, and a fuzz of the infer body."""

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxshard.plans import TensorSpec
from onnxshard.serve import kserve
from onnxshard.serve.tensors import DATATYPES, ProtocolError, from_bytes, from_data, to_bytes, to_data

SPEC = kserve.ModelSpec("m", (TensorSpec("x", "float32", ("batch", 4)), TensorSpec("mask", "bool", ("batch", 4)),
                              TensorSpec("ids", "int64", ("batch", 2)), TensorSpec("label", "string", ("batch",))),
                        (TensorSpec("y", "float32", ("batch", 4)), TensorSpec("label_out", "string", ("batch",))))


def _sample(dtype: str, shape, rng):
    if dtype == "string":
        return np.array([f"s{i}é" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "bfloat16":
        return rng.integers(0, 2**16, shape).astype(np.uint16)
    from onnxshard import dtypes

    return (rng.random(shape) * 100).astype(dtypes.numpy_dtype(dtype))


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_as_json_and_as_bytes(datatype):
    dtype = DATATYPES[datatype]
    spec = TensorSpec("t", dtype, ("batch", 3))
    value = _sample(dtype, (2, 3), np.random.default_rng(0))
    assert kserve.shape_of(spec) == [-1, 3]
    back = from_bytes(spec, (2, 3), to_bytes(value))
    assert back.dtype == value.dtype and np.array_equal(back, value)
    if datatype not in ("FP16", "BF16"):  # JSON numbers: FP16 loses nothing either, but BF16 bits are not numbers
        back = from_data(spec, (2, 3), json.loads(json.dumps(to_data(value))))
        assert back.dtype == value.dtype and np.array_equal(back, value)


def _body(rng=None, *, binary=False, n=2):
    rng = rng or np.random.default_rng(1)
    feeds = {"x": _sample("float32", (n, 4), rng), "mask": _sample("bool", (n, 4), rng),
             "ids": _sample("int64", (n, 2), rng), "label": _sample("string", (n,), rng)}
    types = {"x": "FP32", "mask": "BOOL", "ids": "INT64", "label": "BYTES"}
    inputs, blobs = [], []
    for name, value in feeds.items():
        entry = {"name": name, "shape": list(value.shape), "datatype": types[name]}
        if binary:
            blob = to_bytes(value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = to_data(value)
        inputs.append(entry)
    return feeds, {"id": "r1", "inputs": inputs}, b"".join(blobs)


@pytest.mark.parametrize("binary", [False, True])
def test_a_request_parses_to_the_feeds_it_carries(binary):
    feeds, request, blob = _body(binary=binary)
    head = json.dumps(request).encode()
    parsed = kserve.parse_http(SPEC, head + blob, str(len(head)) if binary else None)
    assert parsed.id == "r1" and sorted(parsed.feeds) == sorted(feeds)
    for name, value in feeds.items():
        assert np.array_equal(parsed.feeds[name], value) and parsed.feeds[name].dtype == value.dtype
    assert parsed.outputs == [("y", False), ("label_out", False)]


def test_the_response_carries_binary_outputs_after_its_json_header():
    _, request, _ = _body()
    request["outputs"] = [{"name": "label_out", "parameters": {"binary_data": True}}, {"name": "y"}]
    parsed = kserve.parse_http(SPEC, json.dumps(request).encode(), None)
    results = {"y": np.ones((2, 4), np.float32), "label_out": np.array(["a", "bé"], dtype=object)}
    body, header_length = kserve.http_response(SPEC, parsed, results)
    head = json.loads(body[:header_length])
    assert head["id"] == "r1" and [o["name"] for o in head["outputs"]] == ["label_out", "y"]
    assert head["outputs"][1]["data"] == [1.0] * 8 and head["outputs"][1]["datatype"] == "FP32"
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    assert body[header_length:] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 3) + "bé".encode()
    assert size == len(body) - header_length


def _mutate(request, target, drop=(), **changes):
    for entry in request["inputs"]:
        if entry["name"] == target:
            entry.update(changes)
            for key in drop:
                entry.pop(key)
    return request


BAD = {
    "malformed JSON": (lambda r: b"{\"inputs\": [", None, "not valid JSON"),
    "missing input": (lambda r: {**r, "inputs": r["inputs"][1:]}, None, "missing input(s) ['x']"),
    "extra input": (lambda r: {**r, "inputs": r["inputs"] + [{"name": "z", "shape": [1], "datatype": "FP32",
                                                              "data": [1]}]}, None, "unknown input 'z'"),
    "misnamed input": (lambda r: _mutate(r, "x", name="X"), None, "unknown input 'X'"),
    "wrong datatype": (lambda r: _mutate(r, "x", datatype="FP64"), None, "input 'x' has datatype 'FP64'"),
    "count mismatch": (lambda r: _mutate(r, "x", shape=[2, 3]), None, "input 'x' has shape [2, 3]"),
    "data short": (lambda r: _mutate(r, "ids", data=[1, 2]), None, "input 'ids': shape [2, 2] holds 4"),
    "non-numeric FP32": (lambda r: _mutate(r, "x", data=["a"] * 8), None, "input 'x': FP32 data must be numbers"),
    "float for INT64": (lambda r: _mutate(r, "ids", data=[1.5] * 4), None, "input 'ids': INT64 data must be whole"),
    "int for BOOL": (lambda r: _mutate(r, "mask", data=[1] * 8), None, "input 'mask': BOOL data must be true/false"),
    "negative shape": (lambda r: _mutate(r, "x", shape=[-2, 4]), None, "input 'x': shape [-2, 4] has a negative"),
    "absurd shape": (lambda r: _mutate(r, "label", shape=[2**40]), None, "input 'label': shape [1099511627776] "
                                                                         "holds more than"),
    "wrong rank": (lambda r: _mutate(r, "label", shape=[2, 1]), None, "input 'label' has shape [2, 1], but the "
                                                                       "model takes rank 1"),
    "shape not a list": (lambda r: _mutate(r, "x", shape="2,4"), None, "input 'x': shape must be a list"),
    "no data": (lambda r: _mutate(r, "x", drop=["data"]), None, "input 'x' has neither 'data' nor binary_data_size"),
    "inputs not a list": (lambda r: {**r, "inputs": {"x": 1}}, None, "'inputs' must be a list"),
    "duplicate input": (lambda r: {**r, "inputs": r["inputs"] + r["inputs"][:1]}, None, "input 'x' is given twice"),
    "unknown output": (lambda r: {**r, "outputs": [{"name": "nope"}]}, None, "unknown output 'nope'"),
    "header past body": (lambda r: r, "100000", "Inference-Header-Content-Length '100000'"),
    "header not a number": (lambda r: r, "ten", "Inference-Header-Content-Length 'ten'"),
    "binary size past body": (lambda r: _mutate(r, "x", drop=["data"], parameters={"binary_data_size": 32}), "",
                              "input 'x': binary_data_size 32 runs past"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_request_is_a_400_naming_what_is_wrong(case):
    change, header, message = BAD[case]
    _, request, _ = _body()
    changed = change(request)
    body = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
    header = str(len(body)) if header == "" else header
    with pytest.raises(ProtocolError) as error:
        kserve.parse_http(SPEC, body, header)
    assert error.value.status == 400 and message in str(error.value), str(error.value)


def test_binary_bytes_that_do_not_fit_are_refused():
    spec = TensorSpec("s", "string", (2,))
    with pytest.raises(ProtocolError, match="runs past the end"):
        from_bytes(spec, (2,), struct.pack("<I", 9) + b"abc")
    with pytest.raises(ProtocolError, match="UTF-8"):
        from_bytes(spec, (1,), struct.pack("<I", 1) + b"\xff")
    with pytest.raises(ProtocolError, match="needs 8 bytes"):
        from_bytes(TensorSpec("f", "float32", (2,)), (2,), b"\0" * 7)
    with pytest.raises(ProtocolError, match="BOOL bytes must be 0 or 1"):
        from_bytes(TensorSpec("b", "bool", (2,)), (2,), b"\x00\x07")
    with pytest.raises(ProtocolError, match="does not fit UINT8"):
        from_data(TensorSpec("u", "uint8", (1,)), (1,), [300])


def test_unknown_versions_are_404():
    kserve.check_version(None)
    kserve.check_version("1")
    with pytest.raises(ProtocolError) as error:
        kserve.check_version("2")
    assert error.value.status == 404


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) |
                     st.text(max_size=8), lambda inner: st.lists(inner, max_size=4) |
                     st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "parameters",
                                                      "binary_data_size", "x", "inputs"]), inner, max_size=4),
                     max_leaves=12)
outcomes = {"parsed": 0, "refused": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_bodies_parse_or_are_refused_with_a_protocol_error(data):
    seed = data.draw(st.integers(0, 2**32 - 1))  # valid bodies differ too (Hypothesis runs no example twice)
    _, request, _ = _body(np.random.default_rng(seed), n=data.draw(st.integers(1, 3)))
    mutate = data.draw(st.booleans())  # about half the bodies stay valid, so both branches run many times
    for entry in request["inputs"]:  # change some fields of a valid request
        key = data.draw(st.sampled_from([None, "shape", "datatype", "data", "name", "parameters"])) if mutate else None
        if key is not None:
            entry[key] = data.draw(_json)
    body = json.dumps(request).encode()
    try:
        parsed = kserve.parse_http(SPEC, body, None)
    except ProtocolError as e:
        assert 400 <= e.status < 500 and str(e)
        outcomes["refused"] += 1
        return
    assert sorted(parsed.feeds) == ["ids", "label", "mask", "x"]
    outcomes["parsed"] += 1


def test_the_fuzz_took_both_branches():
    assert outcomes["parsed"] > 10 and outcomes["refused"] > 10, outcomes


def test_the_repository_lists_plans_and_models_by_folder_name_and_refuses_strays(tmp_path):
    import zoo

    from onnxshard.errors import PlanError
    from onnxshard.serve.repository import discover

    repo = tmp_path / "repo"
    zoo.save(zoo.mlp(), repo / "a")                       # a/model.onnx
    (repo / "b" / "1").mkdir(parents=True)                  # Triton's layout: b/1/model.onnx
    (repo / "a" / "model.onnx").rename(repo / "b" / "1" / "model.onnx")
    zoo.save(zoo.mlp(), repo / "a")
    (repo / "a" / "serve.json").write_text('{"max_batch_size": 4}')
    found = discover(repo, stages=3)
    assert [(s.name, s.workers, s.overrides) for s in found] == [("a", 3, {"max_batch_size": 4}), ("b", 3, {})]
    assert [s.name for s in discover(repo / "a" / "model.onnx")] == ["a"]
    (repo / "a" / "serve.json").write_text('{"max_batch_sise": 4}')
    with pytest.raises(PlanError, match="unknown settings"):
        discover(repo)
    (repo / "a" / "serve.json").unlink()
    (repo / "empty").mkdir()
    with pytest.raises(PlanError, match="empty/ holds no plan.json"):
        discover(repo)
    (repo / "empty").rmdir()
    zoo.save(zoo.mlp(), repo / "bad name!")
    with pytest.raises(PlanError, match="cannot be a model name"):
        discover(repo)

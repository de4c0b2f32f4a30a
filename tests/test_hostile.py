"""Hostile inputs and tampered plans: every outcome is a correct result or an onnxshard error, and the pipeline
stays usable."""

import json
import os

import numpy as np
import pytest
import zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import onnxshard
from onnxshard import InputError, ModelError, OnnxShardError, PlanError
from onnxshard import plans as plan_format
from onnxshard.distributed import Pipeline
from onnxshard.runtime import tools


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    path = zoo.save(zoo.mlp(layers=4, width=8), tmp / "model")
    return path, onnxshard.plan(path, tmp / "plan", stages=2)


@pytest.fixture(scope="module")
def pipe(mlp, ray_session):
    with Pipeline(mlp[1], micro_batch_size=2, cpus_per_stage=0.5) as p:
        yield p


def _good(n=3):
    return {"x": np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)}


def test_object_arrays_are_refused(pipe):
    with pytest.raises(InputError, match="dtype object, expected float32"):
        pipe.run({"x": np.empty((2, 8), dtype=object)})


def test_nan_and_inf_pass_through_as_data(pipe, mlp):
    x = _good(4)["x"]
    x[0, 0], x[1, 1], x[2, 2] = np.nan, np.inf, -np.inf
    got = pipe.run({"x": x})["y"]
    assert tools.max_differences(tools.run_model(mlp[0], {"x": x}), {"y": got}) == {"y": 0.0}
    assert np.isnan(got).any() or np.isinf(got).any()


def test_enormous_batches_are_refused_with_the_size_they_need(pipe):
    huge = np.broadcast_to(np.ones((1, 8), np.float32), (10**9, 8))  # 32 GB virtual, no memory behind it
    with pytest.raises(InputError, match=r"would need about 32\.0 GB .* over the"):
        pipe.run({"x": huge})
    assert pipe.run(_good())["y"].shape == (3, 8)


def test_max_batch_bytes_is_configurable(mlp, ray_session):
    with Pipeline(mlp[1], micro_batch_size=2, cpus_per_stage=0.5, max_batch_bytes=1000) as small:
        with pytest.raises(InputError, match="raise max_batch_bytes"):
            small.run(_good(100))
        assert small.run(_good(3))["y"].shape == (3, 8)


feeds_strategy = st.dictionaries(
    st.sampled_from(["x", "y", "X", ""]),
    st.one_of(
        hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.bool_]),
                   hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
        hnp.arrays(np.float32, st.tuples(st.integers(0, 5), st.sampled_from([7, 8, 9]))),
        st.just([1.0, 2.0]),
    ),
    max_size=2,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(feeds=feeds_strategy)
def test_fuzzed_feeds_give_a_correct_result_or_an_onnxshard_error(pipe, mlp, feeds):
    try:
        got = pipe.run(feeds)
    except OnnxShardError:
        pass
    else:
        assert tools.max_differences(tools.run_model(mlp[0], feeds), got) == {"y": 0.0}
    assert pipe.run(_good())["y"].shape == (3, 8)  # still healthy


def _replan(mlp, tmp_path):
    return onnxshard.plan(mlp[0], tmp_path / "p", stages=2)


def test_garbage_plan_json(mlp, tmp_path):
    _replan(mlp, tmp_path)
    (tmp_path / "p" / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Pipeline(tmp_path / "p")
    (tmp_path / "p" / "plan.json").write_text(json.dumps({"format": "onnxshard.plan", "version": plan_format.VERSION}))
    with pytest.raises(PlanError, match="malformed"):
        Pipeline(tmp_path / "p")


def test_swapped_and_truncated_shards(mlp, tmp_path):
    _replan(mlp, tmp_path)
    a, b = tmp_path / "p" / "stage0.onnx", tmp_path / "p" / "stage1.onnx"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(PlanError, match="stage 0 file .* was altered"):
        Pipeline(tmp_path / "p")
    a.write_bytes(data_a[: len(data_a) // 2])
    b.write_bytes(data_b)
    with pytest.raises(PlanError, match="altered"):
        onnxshard.load_plan(tmp_path / "p")


def test_weight_paths_escaping_the_plan_are_refused(tmp_path):
    path = zoo.save(zoo.mlp(width=64), tmp_path / "m", external=True)
    onnxshard.plan(path, tmp_path / "p", stages=2)
    plan_json = tmp_path / "p" / "plan.json"
    data = json.loads(plan_json.read_text())
    for bad in ("../m/model.onnx.data", "/etc/passwd"):
        data["weights"]["files"] = {bad: 1}
        plan_json.write_text(json.dumps(data))
        with pytest.raises(PlanError, match="leaves its folder|must be relative"):
            onnxshard.load_plan(tmp_path / "p")


def test_weight_symlink_out_of_the_plan_is_refused(tmp_path):
    path = zoo.save(zoo.mlp(width=64), tmp_path / "m", external=True)
    onnxshard.plan(path, tmp_path / "p", stages=2)
    linked = tmp_path / "p" / "weights" / "model.onnx.data"
    linked.unlink()
    os.symlink(tmp_path / "m" / "model.onnx.data", linked)
    with pytest.raises(PlanError, match="leaves its folder"):
        onnxshard.load_plan(tmp_path / "p")


def test_model_external_data_symlinked_out_of_its_folder_is_refused(tmp_path):
    path = zoo.save(zoo.mlp(width=64), tmp_path / "m", external=True)
    outside = tmp_path / "elsewhere.data"
    (tmp_path / "m" / "model.onnx.data").rename(outside)
    os.symlink(outside, tmp_path / "m" / "model.onnx.data")
    with pytest.raises(ModelError, match="outside the model folder"):
        onnxshard.plan(path, tmp_path / "p", stages=2)

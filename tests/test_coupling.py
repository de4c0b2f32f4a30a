"""Models whose result for one sample depends on the rest of its batch: found by the planner, said by the
pipeline (once, naming the node), never joined by dynamic batching, and checked by `verify --micro-batch-size`."""

import warnings

import numpy as np
import pytest
import zoo
from onnx import TensorProto as T
from onnx import helper as h

import onnxshard
from onnxshard.cli import main
from onnxshard.partitioner import analyse_model
from onnxshard.partitioner.coupling import batch_coupled
from onnxshard.runtime import tools


def _coupled(model, save_model):
    analysis = analyse_model(save_model(model))
    return batch_coupled(analysis.graph, analysis.specs)


def test_the_planner_finds_what_mixes_samples_along_each_dim(save_model):
    found = _coupled(zoo.batch_coupled(axis=0), save_model)
    assert list(found) == ["batch"] and "'batch_mean' (ReduceMean) reduces along axis 0" in found["batch"][0]
    assert _coupled(zoo.batch_coupled(axis=1), save_model) == {}  # the same op over features: independent
    assert _coupled(zoo.batch_coupled(axis=-2), save_model).keys() == {"batch"}  # negative axes count from the end
    for model in (zoo.mlp(), zoo.transformer(layers=1), zoo.cnn()):
        assert "batch" not in _coupled(model, save_model)
    assert "Softmax" in _coupled(zoo.transformer(layers=1), save_model)["seq"][0]  # attention mixes along seq


@pytest.mark.parametrize("node,coupled", [
    (h.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]), True),
    (h.make_node("Softmax", ["x"], ["q"], axis=0), True),
    (h.make_node("Softmax", ["x"], ["q"], axis=1), False),
    (h.make_node("MeanVarianceNormalization", ["x"], ["q"], axes=[1]), False),
    (h.make_node("ArgMax", ["x"], ["q"], axis=0), True),
    (h.make_node("ArgMax", ["x"], ["q"], axis=1), False),
])
def test_each_rule_moves_with_its_axis(node, coupled, save_model):
    outs = [h.make_tensor_value_info(o, T.FLOAT if o != "q" or node.op_type not in ("DynamicQuantizeLinear",
                                                                                     "ArgMax") else
                                     (T.UINT8 if node.op_type == "DynamicQuantizeLinear" else T.INT64), None)
            for o in node.output]
    outs = [o for o in outs if o.name == "q"]
    model = h.make_model(h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])], outs),
                         opset_imports=[h.make_opsetid("", 17)])
    assert bool(_coupled(model, save_model)) is coupled


def test_the_pipeline_warns_once_and_verify_per_micro_batch_holds(ray_session, save_model, tmp_path, capsys):
    path = save_model(zoo.batch_coupled())
    plan = onnxshard.plan(path, tmp_path / "p", stages=2)
    assert plan.batch_coupled["batch"] and "samples depend on each other along 'batch'" in plan.table()
    assert onnxshard.load_plan(tmp_path / "p").batch_coupled == plan.batch_coupled  # kept in plan.json
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    whole = tools.run_model(path, feeds)["y"]
    per_two = np.concatenate([tools.run_model(path, {"x": feeds["x"][i:i + 2]})["y"] for i in range(0, 8, 2)])
    assert not np.allclose(whole, per_two, atol=1e-3)  # the model really is batch-coupled
    with onnxshard.Pipeline(plan, micro_batch_size=2, cpus_per_stage=0.5, max_batch_size=64) as pipe:
        with pytest.warns(UserWarning, match=r"'batch_mean' \(ReduceMean\).*micro_batch_size=8"):
            got = pipe.run(feeds)["y"]
        np.testing.assert_allclose(got, per_two, atol=1e-5)  # what micro-batching gives, and said so
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            pipe.run(feeds)
        np.testing.assert_allclose(pipe.run(feeds, micro_batch_size=8)["y"], whole, atol=1e-5)  # kept whole
        before = pipe.totals
        import threading

        barrier = threading.Barrier(6)

        def one(i):
            barrier.wait()
            return pipe.run({"x": feeds["x"][i:i + 1]}, micro_batch_size=8)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        after = pipe.totals
        assert after["batches"] - before["batches"] == after["requests"] - before["requests"] == 6  # never joined
    assert onnxshard.verify(plan).ok  # stages in sequence on the whole batch
    assert onnxshard.verify(plan, micro_batch_size=2).ok  # and per micro-batch, against ORT per micro-batch
    np.savez(tmp_path / "in.npz", **feeds)
    assert main(["verify", str(tmp_path / "p"), "--inputs", str(tmp_path / "in.npz"), "--micro-batch-size", "2"]) == 0
    assert "OK" in capsys.readouterr().out


def _if_quantizing(quantize: bool):
    """``y = If(flag, then: dequantize(DynamicQuantizeLinear(x)) or x, else: x)`` on x [batch, 4]."""
    x = h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])
    y = h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])
    if quantize:
        then = h.make_graph([h.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"], name="dq"),
                             h.make_node("DequantizeLinear", ["q", "scale", "zero"], ["t"])], "then", [],
                            [h.make_tensor_value_info("t", T.FLOAT, None)])
    else:
        then = h.make_graph([h.make_node("Neg", ["x"], ["t"])], "then", [], [h.make_tensor_value_info("t", T.FLOAT, None)])
    other = h.make_graph([h.make_node("Identity", ["x"], ["e"])], "else", [], [h.make_tensor_value_info("e", T.FLOAT, None)])
    node = h.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other, name="branch")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("flag", T.BOOL, []), x], [y])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_whole_tensor_ops_inside_control_flow_bodies_are_found(save_model):
    found = _coupled(_if_quantizing(True), save_model)
    assert list(found) == ["batch"] and "'branch' (If) runs DynamicQuantizeLinear in a subgraph" in found["batch"][0]
    assert _coupled(_if_quantizing(False), save_model) == {}

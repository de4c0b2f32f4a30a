"""Partitioner correctness on the zoo: every stage count reproduces the unsplit model in plain ONNX Runtime."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo

import onnxshard
from onnxshard import plans
from onnxshard.errors import PlanError
from onnxshard.runtime import tools


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_stage_count_matches_unsplit_model(name, save_model, tmp_path):
    path = save_model(zoo.ZOO[name]())
    feeds = None
    for stages in range(1, 7):
        plan = onnxshard.plan(path, tmp_path / f"plan{stages}", stages=stages)
        assert plan.num_stages == stages
        feeds = feeds or tools.random_feeds(plan.inputs, dims={"batch": 3, "seq": 5})
        result = onnxshard.verify(plan, feeds=feeds, tolerance=1e-6)
        assert result.ok, (stages, result.differences)


@pytest.mark.parametrize("name", ["transformer", "control_flow", "multi_io"])
def test_external_weights_are_linked_not_copied(name, save_model, tmp_path):
    path = save_model(zoo.ZOO[name](), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=3)
    assert plan.weights.mode == "link"
    linked = tmp_path / "plan" / "weights" / "model.onnx.data"
    assert linked.stat().st_ino == (path.parent / "model.onnx.data").stat().st_ino  # same file, no bytes copied
    assert onnxshard.verify(plan, tolerance=1e-6).ok


def test_each_stage_is_a_standalone_onnx_file_plain_ort_loads(save_model, tmp_path):
    path = save_model(zoo.transformer(layers=3), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=3)
    feeds = tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": 4})
    env = dict(feeds)
    for stage in plan.stages:
        session = ort.InferenceSession(str(tmp_path / "plan" / stage.file))  # plain ORT, from the plan folder
        assert [i.name for i in session.get_inputs()] == stage.input_names
        env.update(zip(stage.output_names, session.run(stage.output_names, {n: env[n] for n in stage.input_names})))
    reference = tools.run_model(path, feeds)
    np.testing.assert_allclose(env["y"], reference["y"], rtol=0, atol=1e-6)


def test_plan_json_is_versioned_and_lists_stages_in_order(save_model, tmp_path):
    plan = onnxshard.plan(save_model(zoo.mlp()), tmp_path / "plan", stages=3)
    data = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert data["format"] == "onnxshard.plan" and data["version"] == plans.VERSION == 3
    assert [s["file"] for s in data["stages"]] == ["stage0.onnx", "stage1.onnx", "stage2.onnx"]
    assert all({"inputs", "outputs", "carry", "sha256"} <= set(s) for s in data["stages"])
    assert onnxshard.load_plan(tmp_path / "plan") == plan
    assert all(s["work"] > s["flops"] > 0 for s in data["stages"])  # the bytes each stage moves, on top
    for s in data["stages"]:  # a plan written before stages recorded their work: its FLOPs stand in
        del s["work"]
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(data))
    assert [s.work for s in onnxshard.load_plan(tmp_path / "plan").stages] == [s.flops for s in plan.stages]


def test_transformer_12_layers_4_stages_balanced_cut_on_residual_stream(save_model, tmp_path):
    path = save_model(zoo.transformer(layers=12, d=64, heads=4, ffn=256))
    plan = onnxshard.plan(path, tmp_path / "plan", stages=4, dims={"seq": 32})
    work = [s.work for s in plan.stages]
    assert max(work) <= 1.05 * np.mean(work)
    for stage in plan.stages[:-1]:
        sent = set(stage.output_names) | set(stage.carry)
        residual = [n for n in sent if n.endswith(".out") or n == "x"]
        assert len(residual) == 1 and sent - set(residual) <= {"bias"}, sent  # bias: the mask, broadcast form


def test_dims_reach_layers_after_a_broadcast_that_shape_inference_leaves_anonymous(save_model, tmp_path):
    """GPT-2 adds a position embedding sliced to the sequence length: ONNX shape inference types the sum, and
    every layer after it, with an anonymous dim instead of ``seq``. ``dims`` must still size those layers, or the
    LM head (typed ``seq`` from the graph output) outweighs them all and takes a stage alone."""
    from onnxshard import models, partitioner

    path = save_model(models.gpt2(layers=4, d=64, heads=4, vocab=4096, max_seq=64), external=True)
    plain = partitioner.analyse_model(path)
    sized = partitioner.analyse_model(path, dims={"seq": 64})
    fc = next(i for i, n in enumerate(sized.graph.nodes) if n.output[0] == "h0.f1")
    assert isinstance(sized.specs["h0.f1"].shape[1], str)  # the spec keeps its symbol; only costs are sized
    assert sized.costs[fc].flops == 64 * plain.costs[fc].flops
    plan = onnxshard.plan(path, tmp_path / "plan", stages=2, dims={"seq": 64})
    work = [s.work + s.boundary_work for s in plan.stages]  # the second stage also sends the logits on
    assert max(work) <= 1.2 * np.mean(work), work
    assert onnxshard.verify(plan, dims={"seq": 8}, tolerance=1e-5).ok


def test_input_specs_leave_out_initializers_and_feeds_size_their_dims(save_model):
    """What ``onnxshard bench`` cuts a model for: the inputs it declares (older exporters also list every
    initializer as an input) and the sizes the feeds give their symbolic dims."""
    from onnxshard.partitioner import input_specs
    from onnxshard.runtime.session import feed_dims

    model = zoo.mlp(layers=2, width=8)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    specs = input_specs(save_model(model, external=True))
    assert [(t.name, t.dtype, t.shape) for t in specs] == [("x", "float32", ("batch", 8))]
    assert feed_dims({"x": np.zeros((5, 8), np.float32)}, specs) == {"batch": 5}


def test_skip_connection_is_carried_through_middle_stages(save_model, tmp_path):
    plan = onnxshard.plan(save_model(zoo.multi_io()), tmp_path / "plan", cuts=["early", "t1", "t2"])
    assert plan.num_stages == 4
    assert "s0" in plan.stages[1].carry and "s0" in plan.stages[2].carry  # made in 0, read in 3
    assert "early" in plan.stages[0].output_names and "early" in plan.stages[1].carry  # early graph output
    assert onnxshard.verify(plan, tolerance=0).ok


def test_shared_initializer_lands_in_each_stage_that_reads_it(save_model, tmp_path):
    plan = onnxshard.plan(save_model(zoo.multi_io()), tmp_path / "plan", cuts=["early", "t2"])
    holders = [s.index for s in plan.stages
               if "Wshared" in {i.name for i in onnx.load(str(tmp_path / "plan" / s.file)).graph.initializer}]
    assert holders == [0, 2]


def test_constant_held_weights_are_replicated_and_counted(save_model, tmp_path):
    plan = onnxshard.plan(save_model(zoo.constant_weights()), tmp_path / "plan", stages=4)
    assert all(s.param_bytes == 8 * 8 * 4 for s in plan.stages)  # one Constant weight per stage, none crossing
    assert all(not s.carry and len(s.inputs) == 1 for s in plan.stages)


def test_stage_files_record_pipeline_stage_and_local_functions(save_model, tmp_path):
    plan = onnxshard.plan(save_model(zoo.local_function()), tmp_path / "plan", stages=3)
    for stage in plan.stages:
        model = onnx.load(str(tmp_path / "plan" / stage.file))
        assert {c.pipeline_stage for n in model.graph.node for c in n.device_configurations} == {stage.index}
        called = {n.op_type for n in model.graph.node if n.domain == "custom.fn"}
        defined = {f.name for f in model.functions}
        assert called <= defined
        if "SwishPlus" in called:
            assert "Swish" in defined  # transitively used
        assert model.configuration[0].num_devices == 3


def test_pipeline_stage_annotations_in_the_model_are_honoured(save_model, tmp_path):
    model = zoo.mlp(layers=4)
    for i, node in enumerate(model.graph.node):
        node.device_configurations.add(configuration_id="user", pipeline_stage=0 if i < 2 else 1 if i < 9 else 2)
    plan = onnxshard.plan(save_model(model), tmp_path / "plan")
    assert [s.nodes for s in plan.stages] == [2, 7, 3]
    assert onnxshard.verify(plan, tolerance=0).ok


def test_pins_out_of_order_are_reordered_without_changing_the_callers_analysis(save_model, tmp_path):
    from onnx import TensorProto as T
    from onnx import helper as h

    from onnxshard.partitioner import analyse_model, partition

    # listed: Relu (stage 1), Neg (stage 0), Add (stage 1): the partitioner must put Neg first
    nodes = [h.make_node("Relu", ["x"], ["a"], name="relu"), h.make_node("Neg", ["x"], ["b"], name="neg"),
             h.make_node("Add", ["a", "b"], ["y"], name="add")]
    for node, stage in zip(nodes, (1, 0, 1)):
        node.device_configurations.add(pipeline_stage=stage)
    model = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
                                      [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])]),
                         opset_imports=[h.make_opsetid("", 17)])
    analysis = analyse_model(save_model(model))
    plan = partition(analysis, tmp_path / "plan")
    assert [s.nodes for s in plan.stages] == [1, 2] and plan.stages[0].output_names == ["b"]
    assert [n.name for n in analysis.graph.nodes] == ["relu", "neg", "add"]  # the caller's analysis is untouched
    assert onnxshard.verify(plan, tolerance=0).ok


def test_partial_annotations_constrain_the_automatic_split(save_model, tmp_path):
    model = zoo.mlp(layers=6)
    model.graph.node[0].device_configurations.add(pipeline_stage=0)
    model.graph.node[-1].device_configurations.add(pipeline_stage=1)
    model.graph.node[3].device_configurations.add(pipeline_stage=1)
    plan = onnxshard.plan(save_model(model), tmp_path / "plan")
    assert plan.num_stages == 2 and plan.stages[0].nodes <= 3


def test_max_stage_memory_chooses_the_stage_count(save_model, tmp_path):
    path = save_model(zoo.mlp(layers=6, width=64))  # each layer ~16.6 KB of weights
    plan = onnxshard.plan(path, tmp_path / "plan", max_stage_memory="40KB")
    assert plan.num_stages == 3 and all(s.param_bytes <= 40_000 and s.tensor_parallel == 1 for s in plan.stages)
    # A layer alone is over 10 KB: the planner splits layers across tensor-parallel ranks instead.
    plan = onnxshard.plan(path, tmp_path / "plan2", max_stage_memory="10KB")
    assert plan.stages[0].tensor_parallel > 1 and all(s.param_bytes <= 10_000 for s in plan.stages)
    with pytest.raises(PlanError, match="max-stage-memory"):
        onnxshard.plan(path, tmp_path / "plan3", max_stage_memory="1KB")


def test_copy_weights_makes_a_self_contained_plan(save_model, tmp_path):
    import shutil

    path = save_model(zoo.transformer(layers=2), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=2, copy_weights=True)
    assert plan.weights.mode == "copy" and set(plan.weights.files) == {"weights/stage0.bin", "weights/stage1.bin"}
    feeds = tools.random_feeds(plan.inputs)
    reference = tools.run_model(path, feeds)
    shutil.rmtree(path.parent)
    got = tools.run_stages(onnxshard.load_plan(tmp_path / "plan"), feeds)
    assert tools.max_differences(reference, got) == {"y": 0.0}


def test_profile_and_optimize_options(save_model, tmp_path):
    path = save_model(zoo.transformer(layers=4), external=True)
    plan = onnxshard.plan(path, tmp_path / "p1", stages=2, profile=True)
    assert plan.cost_source == "profile" and onnxshard.verify(plan, tolerance=1e-6).ok
    feeds = tools.random_feeds(plan.inputs, dims={"batch": 3, "seq": 7})
    plan = onnxshard.plan(path, tmp_path / "p3", stages=2, profile=True, profile_feeds=feeds)  # measured on these
    assert plan.cost_source == "profile" and onnxshard.verify(plan, feeds=feeds, tolerance=1e-6).ok
    plan = onnxshard.plan(path, tmp_path / "p2", stages=2, optimize=True)
    assert plan.weights.mode == "copy"
    assert onnxshard.verify(plan, tolerance=1e-5).ok


def test_contrib_op_outputs_are_typed_by_onnx_runtime(save_model, tmp_path):
    path = save_model(zoo.transformer(layers=2, gelu_contrib=True))
    plan = onnxshard.plan(path, tmp_path / "plan", cuts=["l0.g"])  # Gelu's output: onnx cannot infer it
    spec = plan.spec("l0.g")
    assert spec.dtype == "float32" and spec.shape == ("batch", "seq", 64)
    assert onnxshard.verify(plan, tolerance=0).ok


def test_loaded_plan_rejects_altered_files(save_model, tmp_path):
    path = save_model(zoo.mlp(), external=True)
    onnxshard.plan(path, tmp_path / "plan", stages=2)
    stage = tmp_path / "plan" / "stage1.onnx"
    stage.write_bytes(stage.read_bytes() + b"\0")
    with pytest.raises(PlanError, match="altered"):
        onnxshard.load_plan(tmp_path / "plan")


def test_loaded_plan_refuses_paths_leaving_the_folder(save_model, tmp_path):
    onnxshard.plan(save_model(zoo.mlp()), tmp_path / "plan", stages=2)
    plan_json = tmp_path / "plan" / "plan.json"
    data = json.loads(plan_json.read_text())
    data["stages"][0]["file"] = "../model/model.onnx"
    plan_json.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="leaves its folder"):
        onnxshard.load_plan(tmp_path / "plan")
    data["stages"][0]["file"] = "/etc/passwd"
    plan_json.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="must be relative"):
        onnxshard.load_plan(tmp_path / "plan")


def test_loaded_plan_notices_a_changed_weight_file(save_model, tmp_path):
    path = save_model(zoo.mlp(width=64), external=True)
    onnxshard.plan(path, tmp_path / "plan", stages=2)
    with open(path.parent / "model.onnx.data", "ab") as f:
        f.write(b"extra")
    with pytest.raises(PlanError, match="changed after planning"):
        onnxshard.load_plan(tmp_path / "plan")


def test_the_decision_is_a_frozen_value_made_without_writing(tmp_path):
    import dataclasses

    from onnxshard.partitioner import analyse_model, decide

    path = zoo.save(zoo.mlp(layers=6), tmp_path / "m")
    analysis = analyse_model(path)
    two, three = decide(analysis, stages=2), decide(analysis, stages=3)
    assert len(two.bounds) == 3 and len(three.bounds) == 4 and two.layout is None
    assert two.bounds[0] == 0 and two.bounds[-1] == len(analysis.graph.nodes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        two.bounds = (0,)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # nothing written


def test_dims_named_question_mark_are_unknown_not_one_shared_dim(save_model, tmp_path):
    """PaddleOCR exports name every unknown dim ``?`` (``x: [?, 3, 48, ?]``): the height-48 image of width 192
    must not be refused because its two ``?`` dims differ."""
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("ReduceMean", ["a"], ["y"], axes=[2], keepdims=0)]
    graph = h.make_graph(nodes, "paddle", [h.make_tensor_value_info("x", T.FLOAT, ["?", 3, 48, "?"])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["?", 3, "?"])])
    path = save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    plan = onnxshard.plan(path, tmp_path / "plan", stages=2)
    assert plan.inputs[0].shape == (None, 3, 48, None)
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 192), dtype=np.float32)
    assert onnxshard.verify(plan, feeds={"x": x}).ok


def test_a_failed_shape_inference_is_said_not_swallowed(save_model, tmp_path, monkeypatch, caplog):
    """ONNX shape inference raising (a model it cannot read) leaves the planner with the declared shapes only: it
    says so. The failure is simulated: in its non-strict mode, the one the planner uses, inference rarely raises."""
    def fails(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] simulated")

    path = save_model(zoo.mlp(layers=2, width=8))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fails)
    with caplog.at_level("WARNING", logger="onnxshard.partitioner.cost"):
        plan = onnxshard.plan(path, tmp_path / "plan", stages=2)
    assert "ONNX shape inference failed on this model ([ShapeInferenceError] simulated)" in caplog.text
    assert len(plan.stages) == 2


def test_a_plan_made_without_out_lives_as_long_as_the_process_and_no_longer(save_model):
    """``plan(model)`` and ``verify(model)`` plan into temporary folders: usable while the process runs (verify's
    result holds its plan), removed when it exits."""
    import subprocess
    import sys
    from pathlib import Path

    path = save_model(zoo.mlp(layers=2, width=8))
    code = ("import onnxshard, sys; p = onnxshard.plan(sys.argv[1], stages=2); v = onnxshard.verify(sys.argv[1], "
            "stages=2); assert v.ok and v.plan.root.is_dir() and p.root.is_dir(); "
            "assert all(v.plan.stage_path(s).is_file() for s in v.plan.stages); print(p.root, v.plan.root)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    roots = [Path(r) for r in done.stdout.split()]
    assert len(roots) == 2 and not any(r.exists() or r.parent.exists() for r in roots), roots


def test_a_weight_read_by_two_stages_counts_in_each_when_the_cut_is_chosen(save_model, tmp_path):
    """W (1 MiB) is read by the first and the last MatMul, A and B (1 MiB each) by those between. Under a 1.5 MiB
    cap, counting W once made 3 stages look enough ([W | A | B, W]), and the writer then refused stage 2 for
    holding 2 MiB; counted in each stage that reads it, the planner takes 4 stages, each within the cap."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    weights = [nh.from_array(rng.standard_normal((512, 512), dtype=np.float32) / 30, n) for n in "WAB"]
    nodes = [h.make_node("MatMul", ["x", "W"], ["a"]), h.make_node("MatMul", ["a", "A"], ["b"]),
             h.make_node("MatMul", ["b", "B"], ["c"]), h.make_node("MatMul", ["c", "W"], ["y"])]
    graph = h.make_graph(nodes, "tied", [h.make_tensor_value_info("x", T.FLOAT, ["n", 512])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 512])], initializer=weights)
    path = save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), external=True)
    cap = 1536 << 10
    plan = onnxshard.plan(path, tmp_path / "plan", max_stage_memory=cap)
    assert len(plan.stages) == 4 and all(s.param_bytes <= cap for s in plan.stages)
    with pytest.raises(PlanError, match="no 3-stage split satisfies --max-stage-memory"):
        onnxshard.plan(path, tmp_path / "three", stages=3, max_stage_memory=cap)
    assert onnxshard.verify(plan, dims={"n": 2}).ok


def test_example_inputs_size_the_costs_and_move_the_cut(save_model, tmp_path):
    from onnxshard import models
    from onnxshard.errors import InputError

    path = save_model(models.gpt2(layers=4, d=64, vocab=4096, max_seq=1024), external=True)
    first = {}
    for seq in (8, 1024):
        plan = onnxshard.plan(path, tmp_path / f"s{seq}", stages=2,
                              example_inputs={"ids": np.zeros((2, seq), np.int64)})
        assert plan.cost_dims == {"batch": None, "seq": seq} and not plan.unsized_dims  # costs stay per sample
        assert "counted as 1" not in plan.table()
        first[seq] = plan.stages[0].nodes
    assert first[1024] < first[8]  # attention grows with seq squared: the layers weigh more, the cut moves up
    plain = onnxshard.plan(path, tmp_path / "plain", stages=2)
    assert plain.unsized_dims == ["seq"] and "seq counted as 1" in plain.table()
    assert onnxshard.load_plan(plain.root).cost_dims == {"batch": None, "seq": None}
    with pytest.raises(InputError, match="example_inputs: missing input"):
        onnxshard.plan(path, tmp_path / "bad", example_inputs={"x": np.zeros(2)})

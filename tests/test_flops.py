"""The cost model's FLOP formulas (pure, no ONNX Runtime): recurrent layers, contrib attention, Einsum, and the
note a plan carries for ops it has no formula for."""

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h

import onnxshard
from onnxshard import models
from onnxshard.partitioner.flops import node_flops, unpriced
from onnxshard.plans import TensorSpec


def _specs(**shapes):
    return {name: TensorSpec(name, "float32", shape) for name, shape in shapes.items()}


def test_a_recurrent_layer_counts_every_gate_of_every_step():
    for gates, op, hidden in ((4, "LSTM", 256), (4, "LSTM", 128), (3, "GRU", 256), (1, "RNN", 64)):
        node = h.make_node(op, ["x", "w", "r"], ["y"], hidden_size=hidden)
        specs = _specs(x=("seq", "batch", 64), w=(1, gates * hidden, 64), r=(1, gates * hidden, hidden),
                       y=("seq", 1, "batch", hidden))
        want = 2.0 * 10 * 4 * gates * hidden * (64 + hidden)
        assert node_flops(node, specs, {"seq": 10, "batch": 4}) == want, op
    # the quantized contrib layer real exports use, with its transposed int8 weights: the same products
    node = h.make_node("DynamicQuantizeLSTM", ["x", "w", "r"], ["y"], domain="com.microsoft", hidden_size=32)
    specs = _specs(x=(5, 2, 16), w=(2, 16, 128), r=(2, 32, 128), y=(5, 2, 2, 32))
    assert node_flops(node, specs, {}) == 2.0 * 10 * (2 * 16 * 128 + 2 * 32 * 128)


def test_contrib_attention_counts_the_projection_and_both_score_products():
    node = h.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=4)
    specs = _specs(x=("batch", "seq", 64), w=(64, 192), y=("batch", "seq", 64))
    flops = node_flops(node, specs, {"batch": 2, "seq": 8})
    assert flops == 2.0 * 16 * 64 * 192 + 4.0 * 16 * 8 * 64
    assert node_flops(node, specs, {"batch": 2, "seq": 16}) > 2 * flops  # the scores grow with seq squared
    mha = h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4)
    specs = _specs(q=(2, 8, 64), k=(2, 32, 64), v=(2, 32, 64), y=(2, 8, 64))
    assert node_flops(mha, specs, {}) == 4.0 * 16 * 32 * 64


def test_einsum_counts_every_index_combination():
    node = h.make_node("Einsum", ["a", "b"], ["c"], equation="bij,bjk->bik")
    specs = _specs(a=(3, 4, 5), b=(3, 5, 6), c=(3, 4, 6))
    assert node_flops(node, specs, {}) == 2.0 * 3 * 4 * 5 * 6
    node = h.make_node("Einsum", ["a"], ["c"], equation="...ij->...ji")
    assert node_flops(node, _specs(a=(2, 3, 4), c=(2, 4, 3)), {}) == 24  # ellipsis: one per output element


def test_a_plan_names_the_ops_its_costs_only_guess(save_model, tmp_path):
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]),
             h.make_node("Gelu", ["m"], ["g"], domain="com.microsoft"),  # has a formula: no note
             h.make_node("Relu", ["g"], ["y"])]
    model = models.make_model(nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                              [h.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], [w],
                              opsets=[h.make_opsetid("com.microsoft", 1)])
    assert onnxshard.plan(save_model(model, name="known"), tmp_path / "known-plan").stages[0].notes == ()
    custom = h.make_node("Irfft", ["m"], ["g"], domain="com.microsoft")  # one ORT has, with no formula here
    assert unpriced([custom, *nodes]) == {"com.microsoft.Irfft": 1}
    model.graph.node[1].CopyFrom(h.make_node("Sinc", ["m"], ["g"], domain="my.ops"))
    model.opset_import.append(h.make_opsetid("my.ops", 1))
    notes = onnxshard.plan(save_model(model, name="custom"), tmp_path / "custom-plan", allow_domains=["my.ops"]).stages[0].notes
    assert notes == ("cost model: no FLOP formula for my.ops.Sinc (1 node); counted as one operation per output "
                     "element, so this cut may be unbalanced: plan with --profile to measure them",)


def _matmul_then_elementwise(ops: int, width: int = 256):
    """x @ W, then ``ops`` Relu/Neg ops over [batch, width] activations with a Reshape (a view) in between."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", ["x", "W"], ["m"]),
             h.make_node("Reshape", ["m", "shape"], ["e0"])]
    for i in range(ops):
        nodes.append(h.make_node("Relu" if i % 2 else "Neg", [f"e{i}"], [f"e{i + 1}"]))
    nodes.append(h.make_node("Identity", [f"e{ops}"], ["y"]))
    inits = [models.weight(rng, "W", width, width), onnx.numpy_helper.from_array(np.array([-1, width]), "shape")]
    return models.make_model(nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                             [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)


def test_elementwise_ops_cost_the_bytes_they_move_and_views_nothing(tmp_path):
    from onnxshard.partitioner import analyse_model
    from onnxshard.partitioner.cost import BYTE_FLOPS

    analysis = analyse_model(models.save(_matmul_then_elementwise(4), tmp_path / "m"))
    costs = {n.op_type: c for n, c in zip(analysis.graph.nodes, analysis.costs)}
    assert costs["Relu"].moved_bytes == 2 * 256 * 4  # its input and its output, per sample
    assert costs["Relu"].work == costs["Relu"].flops + BYTE_FLOPS * 2 * 256 * 4
    assert costs["MatMul"].moved_bytes == 2 * 256 * 4  # the activations; the weight is not counted per sample
    assert costs["Reshape"].moved_bytes == 0 and costs["Identity"].moved_bytes == 0


def test_the_cut_moves_into_a_chain_of_elementwise_ops_as_it_grows(tmp_path):
    """By FLOPs alone a MatMul outweighs any chain of elementwise ops after it, so the cut would stay right after
    the MatMul; counting the bytes those ops move, a longer chain pulls more of it into the first stage."""
    in_first = []
    for ops in (2, 8, 16, 32):
        plan = onnxshard.plan(models.save(_matmul_then_elementwise(ops), tmp_path / f"m{ops}"),
                              tmp_path / f"p{ops}", stages=2)
        assert plan.stages[0].flops > plan.stages[1].flops  # the MatMul's FLOPs are all in stage 0
        in_first.append(plan.stages[0].nodes)
        work = [s.work for s in plan.stages]
        if ops >= 8:
            assert max(work) <= 1.25 * np.mean(work), (ops, work)
    assert in_first == sorted(in_first) and in_first[0] < in_first[-1], in_first


def _matmuls_then_wide_output(widen: int, width: int = 64, layers: int = 16):
    """``layers`` MatMuls over [batch, width], then a Tile that makes the output ``widen`` times as wide."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", [f"a{i}", f"W{i}"], [f"a{i + 1}"]) for i in range(layers)]
    nodes.append(h.make_node("Tile", [f"a{layers}", "repeats"], ["y"]))
    inits = [models.weight(rng, f"W{i}", width, width) for i in range(layers)]
    inits.append(onnx.numpy_helper.from_array(np.array([1, widen]), "repeats"))
    return models.make_model(nodes, [h.make_tensor_value_info("a0", TensorProto.FLOAT, ["batch", width])],
                             [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width * widen])], inits)


def test_the_stage_that_sends_a_wide_output_on_keeps_fewer_layers(tmp_path):
    """The graph's outputs leave through the last stage, which copies them out of ORT and sends them: the plan
    charges that stage for their bytes (``boundary_work``), so the wider the output, the later the cut, and later
    than where the nodes' work alone would balance."""
    from onnxshard.partitioner import analyse_model
    from onnxshard.partitioner.cost import RECEIVE_BYTE_FLOPS, SEND_BYTE_FLOPS
    from onnxshard.partitioner.cuts import choose_bounds

    in_first, by_nodes = [], []
    for widen in (1, 2, 4):
        path = models.save(_matmuls_then_wide_output(widen), tmp_path / f"m{widen}")
        plan = onnxshard.plan(path, tmp_path / f"p{widen}", stages=2)
        first, last = plan.stages
        assert first.boundary_work == SEND_BYTE_FLOPS * 64 * 4  # one [batch, 64] float32 row a sample crosses
        assert last.boundary_work == RECEIVE_BYTE_FLOPS * 64 * 4 + SEND_BYTE_FLOPS * 64 * widen * 4
        totals = [s.work + s.boundary_work for s in plan.stages]
        assert max(totals) <= 1.15 * np.mean(totals), (widen, totals)
        in_first.append(first.nodes)
        work = [c.work for c in analyse_model(path).costs]
        by_nodes.append(choose_bounds(work, [0] * len(work), np.zeros(len(work) + 1), 2)[1])
    assert in_first == sorted(in_first) and in_first[0] < in_first[-1], in_first
    assert in_first[-1] > by_nodes[-1], (in_first, by_nodes)


def test_a_decoder_with_a_cache_is_cut_by_its_nodes_work_alone(tmp_path, monkeypatch):
    """Generating, a stage keeps its cache and the last one samples the logits where they are made: neither the
    present values nor the logits leave, so they put no boundary cost on any stage, and the cut is where it is
    without the per-byte costs."""
    from onnxshard import decoder_models
    from onnxshard.partitioner import cost as costmod

    path = models.save(decoder_models.llama_cached(layers=4, d=64, heads=8, kv_heads=2, vocab=4096), tmp_path / "m")
    plan = onnxshard.plan(path, tmp_path / "p", stages=2)
    assert plan.kv_cache and [s.boundary_work for s in plan.stages] == [0.0, 0.0]
    monkeypatch.setattr(costmod, "SEND_BYTE_FLOPS", 0.0)
    monkeypatch.setattr(costmod, "RECEIVE_BYTE_FLOPS", 0.0)
    assert [s.nodes for s in onnxshard.plan(path, tmp_path / "q", stages=2).stages] == [s.nodes for s in plan.stages]


def test_a_decoders_cache_concatenation_weighs_more_as_the_context_grows(tmp_path):
    """The past and present of each layer's cache are bytes, not FLOPs: planned at a longer context, the
    Concat that appends the new token's keys costs in proportion to it."""
    from onnxshard import decoder_models
    from onnxshard.partitioner import analyse_model
    from onnxshard.partitioner.cost import BYTE_FLOPS

    path = models.save(decoder_models.llama_cached(layers=2, d=64, heads=8, kv_heads=2), tmp_path / "m")
    work = {}
    for past in (10, 100):
        analysis = analyse_model(path, dims={"seq": 1, "past": past, "total": past + 1})
        concat = next(c for n, c in zip(analysis.graph.nodes, analysis.costs)
                      if n.op_type == "Concat" and "past_key_values.0.key" in n.input)
        # float32 [1, 2 heads, past, 8] and the new [1, 2, 1, 8] in, [1, 2, past + 1, 8] out
        assert concat.moved_bytes == 4 * 2 * 8 * (past + 1 + past + 1)
        assert concat.work == concat.flops + BYTE_FLOPS * concat.moved_bytes
        work[past] = concat.work
    assert 9 < work[100] / work[10] < 11, work


def test_the_bilstm_benchmark_model_is_one_node_that_is_most_of_the_work(tmp_path):
    """benchmarks/small_requests.py --model bilstm stands for the issue's tagger: its bidirectional LSTM is most of
    the predicted work, so a 3-stage cut is lopsided and a plan for 2 workers is 1 stage x 2 replicas."""
    path = models.save(models.bilstm(), tmp_path / "m")
    x = {"x": np.zeros((256, 4, 64), np.float32)}
    cut = onnxshard.plan(path, tmp_path / "three", stages=3, example_inputs=x)
    works = [s.work for s in cut.stages]
    ops = [{n.op_type for n in onnx.load(cut.stage_path(s), load_external_data=False).graph.node} for s in cut.stages]
    assert works[next(i for i, o in enumerate(ops) if "LSTM" in o)] / sum(works) > 0.9, (works, ops)
    shaped = onnxshard.plan(path, tmp_path / "two", workers=2, example_inputs=x)
    assert (shaped.num_stages, shaped.replicas) == (1, 2)

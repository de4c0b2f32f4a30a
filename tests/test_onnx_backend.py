"""The ONNX conformance suite (``onnx.backend.test``: node tests with their ``_expanded`` function bodies, and the
simple, pytorch-converted and pytorch-operator model tests) through ``onnxshard.backend``, each model split into
as many stages as it has places to cut, up to 3, against plain ONNX Runtime's backend on the same tests in the
same run. onnxshard must pass every test ORT passes; nothing is excluded because splitting broke it (a node test
with float16 outputs that misses its tolerance is held to one fp16 rounding of ORT's result: see
``_fp16_rounding_apart``)."""

from __future__ import annotations

import functools
import re
import time
import unittest
import warnings
import zlib
from collections import Counter

import numpy as np
import onnx
import onnx.backend.test
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import onnxshard
from onnxshard import PlanError
from onnxshard.backend import OnnxShardBackend, prepare
from onnxshard.distributed import Pipeline

# Tests plain ONNX Runtime 1.32 fails on this machine, by reason. Every ORT failure must match one of these (so the
# list stays complete); onnxshard is held to ORT's pass set, not to this list.
ORT_FAILS = {
    "float8, float4, int2/int4, float8e8m0 and bfloat16 tensors: ORT's Python API cannot turn them into or from "
    "numpy arrays": [r"cast(like)?_(no_saturate_)?\w*(FLOAT8|FLOAT4|INT2|INT4|UINT2|UINT4|BFLOAT16|e8m0)",
                     r"(celu|compress|einsum_\w+|range|reversesequence|unique)_bfloat16",
                     r"dequantizelinear_e4m3fn_float16"],
    "ORT has no CPU kernel for the op at this opset or type": [
        r"AvgPool", r"BatchNorm\dd", r"GLU", r"test_Linear_cpu", r"PReLU", r"PoissonNLLLLoss", r"Softsign",
        r"attention_\w+_bf16", r"bernoulli", r"bitcast", r"celu_bfloat16", r"(de)?quantizelinear",
        r"image_decoder", r"(max|min)_u?int16", r"onehot_with_bfloat16", r"operator_(add|basic|mm|non_float|params|pow)",
        r"optional_(get|has)_element", r"pow_types_float32_uint", r"roialign", r"swiglu", r"top_k_uint64"],
    "ai.onnx.preview and ai.onnx.preview.training ops ORT does not register": [
        r"adagrad", r"adam", r"flexattention", r"gradient_of", r"momentum"],
    "ORT refuses the model at load: batchwise RNN layout, StringNormalizer locale": [
        r"(gru|lstm|simple_rnn)_batchwise", r"strnorm"],
    "ORT fails while running: ConvInteger with padding, ReduceMax of an empty bool set": [
        r"convinteger_with_padding", r"reduce_max_empty_set_bool"],
    "ORT's results differ from the reference beyond the test's tolerance (DFT/STFT, fp16 attention, training-mode "
    "Dropout, Resize align_corners, MaxUnpool output_shape, Loop over an empty sequence)": [
        r"dft", r"stft", r"attention_4d_(causal_fp16|diff_heads_mask4d_padded_kv|with_past_and_present_qk_matmul)",
        r"training_dropout", r"resize_downsample_scales_\w+_align_corners", r"maxunpool_export_with_output_shape",
        r"loop16_seq_none"],
}


@functools.cache
def _node_cases() -> dict:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases(None)}


def _fp16_rounding_apart(name: str) -> bool | None:
    """For node test ``name`` (``_cpu`` dropped) whose outputs are all float16: whether onnxshard's outputs lie within
    one fp16 ulp of plain ORT's; ``None`` for any other test. The tolerance of such tests (relative 1e-3) is one
    fp16 rounding, and a split adds one: ORT's CPU provider runs the ops it has no fp16 kernel for in float32,
    casting around them, so inside one graph a chain of them keeps float32 values, while at a stage boundary the
    tensor is the float16 the graph declares."""
    import onnxruntime.backend

    case = _node_cases().get(name)
    if case is None:
        return None
    inputs, expected = case.data_sets[0]
    if not expected or any(np.asarray(e).dtype != np.float16 for e in expected):
        return None
    ours, theirs = prepare(case.model).run(inputs), onnxruntime.backend.prepare(case.model).run(inputs)
    return all(np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= np.spacing(np.abs(b)).astype(np.float32))
               for a, b in zip(ours, theirs))


class Recorded(OnnxShardBackend):
    """onnxshard's backend, noting how many stages each model was split into."""

    stages: Counter = Counter()

    @classmethod
    def prepare(cls, model, device="CPU", **options):
        rep = super().prepare(model, device, **options)
        cls.stages[len(rep.plan.stages)] += 1
        return rep


def _run_suite(backend, keep=lambda name: True) -> tuple[set[str], dict[str, str]]:
    """The suite's CPU tests (those whose name ``keep`` takes) under ``backend``: the names passed, and each
    failure's last line."""
    suite = onnx.backend.test.BackendTest(backend, __name__)
    tests = unittest.TestSuite(test for case in suite.test_cases.values()
                               for test in unittest.defaultTestLoader.loadTestsFromTestCase(case)
                               if test.id().endswith("_cpu") and keep(test.id().rsplit(".", 1)[-1]))

    class Result(unittest.TestResult):
        def __init__(self):
            super().__init__()
            self.passed: set[str] = set()

        def addSuccess(self, test):
            self.passed.add(test.id().rsplit(".", 1)[-1])

    result = Result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tests.run(result)
    failed = {t.id().rsplit(".", 1)[-1]: text.strip().splitlines()[-1] for t, text in result.failures + result.errors}
    return result.passed, failed


@pytest.fixture
def onnx_home(tmp_path, monkeypatch):
    """The suite's 'real' models (small copies in the wheel) get their test data written under $ONNX_HOME."""
    monkeypatch.setenv("ONNX_HOME", str(tmp_path / "onnx_home"))


def test_the_conformance_suite_passes_everything_plain_onnxruntime_passes_with_the_models_split(onnx_home):
    import onnxruntime.backend

    started = time.perf_counter()
    ort_passed, ort_failed = _run_suite(onnxruntime.backend)
    ort_s = time.perf_counter() - started
    Recorded.stages.clear()
    passed, failed = _run_suite(Recorded)
    print(f"ONNX backend suite: ORT passed {len(ort_passed)}, failed {len(ort_failed)} ({ort_s:.0f} s); onnxshard "
          f"passed {len(passed)}, failed {len(failed)} ({time.perf_counter() - started - ort_s:.0f} s); models split "
          f"into 1/2/3 stages: {Recorded.stages[1]}/{Recorded.stages[2]}/{Recorded.stages[3]}")
    assert len(ort_passed) > 1500, "the suite did not run (ORT passed too few tests)"
    broken = {t: failed.get(t, "not run") for t in sorted(ort_passed - passed)}
    for name in list(broken):  # an fp16 node test is held to one fp16 rounding of ORT's own result instead
        apart = _fp16_rounding_apart(name.removesuffix("_cpu"))
        assert apart is not False, f"{name}: onnxshard's fp16 outputs are more than one fp16 ulp from ORT's"
        if apart:
            del broken[name]
    assert not broken, f"onnxshard fails {len(broken)} test(s) plain ORT passes: {broken}"
    # the split is real: every model of more than one node went through 2 or 3 stages (most node tests are one node)
    assert Recorded.stages[3] > 300 and Recorded.stages[2] > 20, Recorded.stages
    unlisted = sorted(t for t in ort_failed if not any(re.search(p, t) for ps in ORT_FAILS.values() for p in ps))
    assert not unlisted, f"plain ORT fails tests ORT_FAILS does not list; add each with its reason: {unlisted}"


def _sequence_model(save_model):
    """x -> SplitToSequence -> SequenceAt(0) and SequenceLength: a sequence lives between three nodes."""
    nodes = [h.make_node("Relu", ["x"], ["r"]),
             h.make_node("SplitToSequence", ["r"], ["seq"], axis=0),
             h.make_node("SequenceLength", ["seq"], ["n"]),
             h.make_node("SequenceAt", ["seq", "n_minus"], ["first"]),
             h.make_node("Neg", ["first"], ["y"])]
    graph = h.make_graph(nodes, "seq", [h.make_tensor_value_info("x", T.FLOAT, [3, 4]),
                                        h.make_tensor_value_info("n_minus", T.INT64, [])],
                         [h.make_tensor_value_info("y", T.FLOAT, None), h.make_tensor_value_info("n", T.INT64, [])])
    return save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_cuts_go_around_a_sequence_and_a_cut_through_it_is_refused_by_name(save_model, tmp_path):
    path = _sequence_model(save_model)
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(3, 4) - 5, "n_minus": np.array(0, np.int64)}
    with pytest.raises(PlanError, match=r"cannot make 4 stages: use --stages 3 or fewer") as e:
        onnxshard.plan(path, tmp_path / "four", stages=4)
    assert "'seq'" in str(e.value)
    plan = onnxshard.plan(path, tmp_path / "three", stages=3)
    assert len(plan.stages) == 3
    crossing = {t.name for s in plan.stages[1:] for t in s.inputs}
    assert "seq" not in crossing
    assert onnxshard.verify(plan, feeds=feeds).ok
    with pytest.raises(PlanError, match=r"'seq' is not a plain tensor .* cannot cross a stage boundary"):
        onnxshard.plan(path, tmp_path / "cut", cuts=["seq"])


def test_a_model_with_a_sequence_input_runs_in_process_and_a_pipeline_refuses_it_by_name(tmp_path):
    seq = h.make_tensor_sequence_value_info("xs", T.FLOAT, None)
    nodes = [h.make_node("SequenceLength", ["xs"], ["n"]), h.make_node("Cast", ["n"], ["nf"], to=T.FLOAT),
             h.make_node("Mul", ["nf", "w"], ["y"])]
    graph = h.make_graph(nodes, "seqin", [seq, h.make_tensor_value_info("w", T.FLOAT, [2])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    rep = prepare(model)
    assert len(rep.plan.stages) == 3
    xs = [np.zeros(3, np.float32)] * 4
    (y,) = rep.run([xs, np.array([1.0, 2.0], np.float32)])
    np.testing.assert_array_equal(y, [4.0, 8.0])
    folder = rep.plan.root
    rep.close()
    assert not folder.exists()
    onnx.save(model, tmp_path / "m.onnx")
    plan = onnxshard.plan(tmp_path / "m.onnx", tmp_path / "plan", stages=1)
    with pytest.raises(PlanError, match=r"input 'xs' is not a plain tensor .*, which a Pipeline cannot carry"):
        Pipeline(plan)  # refused before Ray starts


def test_a_subgraph_reading_an_outer_tensor_from_an_earlier_node_is_cut_correctly(save_model):
    """If's branches read ``a`` (made by the first node) from the outer scope: the stage holding the If must
    receive it."""
    then = h.make_graph([h.make_node("Add", ["a", "x"], ["t"])], "then", [],
                        [h.make_tensor_value_info("t", T.FLOAT, [2, 3])])
    other = h.make_graph([h.make_node("Sub", ["a", "x"], ["e"])], "else", [],
                         [h.make_tensor_value_info("e", T.FLOAT, [2, 3])])
    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             h.make_node("Greater", ["s", "zero"], ["c"]), h.make_node("If", ["c"], ["z"], then_branch=then,
                                                                       else_branch=other),
             h.make_node("Tanh", ["z"], ["y"])]
    graph = h.make_graph(nodes, "outer", [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 3])],
                         initializer=[onnx.numpy_helper.from_array(np.float32(0), "zero")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    rep = prepare(model)
    assert len(rep.plan.stages) == 3
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for sign in (1, -1):
        x = sign * np.abs(np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32))
        (want,) = session.run(None, {"x": x})
        np.testing.assert_allclose(rep.run([x])[0], want, rtol=1e-6)
    rep.close()


class PipelineBackend(OnnxShardBackend):
    """Through a Ray pipeline with one-sample micro-batches (where the model has a batch dim). The runner never
    closes a rep, so each prepare closes the one before (its workers and placement group)."""

    open: list = []

    @classmethod
    def prepare(cls, model, device="CPU", **options):
        cls.close_all()
        rep = super().prepare(model, device, pipeline=True, micro_batch_size=1, cpus_per_stage=0.25,
                              worker_start_timeout_s=60, **options)
        cls.open.append(rep)
        return rep

    @classmethod
    def close_all(cls):
        while cls.open:
            cls.open.pop().close()


@pytest.mark.slow
def test_model_tests_and_multi_node_tests_pass_through_a_ray_pipeline(ray_session, onnx_home):
    import onnxruntime.backend

    loader = onnx.backend.test.loader
    node_tests = {t.name for t in loader.load_model_tests(kind="node")}
    torch_tests = {t.name for kind in ("pytorch-converted", "pytorch-operator") for t in loader.load_model_tests(kind=kind)}

    def keep(name):  # the in-process run above takes every test; here each is a pipeline start (seconds)
        base = name.removesuffix("_cpu")
        if base in node_tests:  # single nodes but for the _expanded function bodies: every 32nd of those
            return "_expanded" in base and zlib.crc32(base.encode()) % 32 == 0
        if base in torch_tests:  # many alike (conv, pool, linear variants): every other one
            return zlib.crc32(base.encode()) % 2 == 0
        return True  # the simple and real models

    ort_passed, _ = _run_suite(onnxruntime.backend, keep)
    started = time.perf_counter()
    try:
        passed, failed = _run_suite(PipelineBackend, keep)
    finally:
        PipelineBackend.close_all()
    refused = {t for t, m in failed.items() if "which a Pipeline cannot carry" in m}
    print(f"through a Ray pipeline: {len(passed)} passed, {len(failed)} failed ({len(refused & ort_passed)} of them "
          f"passed by ORT but refused: sequence or optional inputs/outputs) in {time.perf_counter() - started:.0f} s; "
          f"ORT passed {len(ort_passed)}")
    assert len(ort_passed) > 70, "too few tests selected"  # 82 of those taken pass in ORT
    broken = {t: failed.get(t, "not run") for t in sorted(ort_passed - passed - refused)}
    assert not broken, f"the pipeline fails {len(broken)} test(s) plain ORT passes: {broken}"

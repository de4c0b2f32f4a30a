"""Tensor parallelism: column/row/vocab splits within a stage, checked against plain ONNX Runtime on the whole
model, in process (verify) and on real Ray rank workers."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import ray
import zoo

import onnxshard
from onnxshard import models
from onnxshard.distributed import Pipeline
from onnxshard.distributed.timeline import html_timeline
from onnxshard.errors import InputError, PlanError, WorkerError
from onnxshard.runtime import tools

TP_MODELS = {
    "gpt2": (models.gpt2, {"batch": 3, "seq": 7}),
    "llama_gqa": (models.llama, {"batch": 3, "seq": 5}),
    "llama_mha": (lambda: models.llama(heads=4, kv_heads=4), {"batch": 2, "seq": 4}),
    "transformer": (zoo.transformer, {"batch": 3, "seq": 5}),
    "transformer_contrib": (zoo.ZOO["transformer_contrib"], {"batch": 3, "seq": 5}),
    "embedding_transformer": (lambda: zoo.transformer(vocab=4096, d=64, heads=4, ffn=128),
                              {"batch": 2, "seq": 6}),
    "cnn": (zoo.cnn, {"batch": 2}),
    "mlp": (zoo.mlp, {"batch": 5}),
    "multi_io": (zoo.multi_io, {"batch": 3}),
}


def _relative(reference, got):
    return {k: float(np.max(np.abs(reference[k] - got[k])) / max(1e-12, float(np.max(np.abs(reference[k])))))
            for k in reference}


def _total_weights(path, tmp_path):
    return onnxshard.plan(path, tmp_path / "whole").stages[0].param_bytes


@pytest.mark.parametrize("name", sorted(TP_MODELS))
@pytest.mark.parametrize("stages,degree", [(1, 2), (2, 2), (1, 3), (1, 4)])
def test_sharded_stages_match_the_unsplit_model(name, stages, degree, save_model, tmp_path):
    build, dims = TP_MODELS[name]
    path = save_model(build(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=stages, tensor_parallel=degree)
    # a stage where nothing splits (multi_io's tail) stays an ordinary one-worker stage
    assert {s.tensor_parallel for s in plan.stages} <= {1, degree} and plan.stages[0].tensor_parallel == degree
    feeds = tools.random_feeds(plan.inputs, dims=dims, seed=1)
    if "ids" in feeds:  # ids across the whole vocabulary, so every rank's rows are read
        feeds["ids"] = np.random.default_rng(1).integers(0, 4096, feeds["ids"].shape)
    rel = _relative(tools.run_model(path, feeds), tools.run_stages(plan, feeds))
    assert max(rel.values()) <= 1e-4, rel


@pytest.mark.parametrize("build", [models.gpt2, models.llama], ids=["gpt2", "llama_gqa"])
def test_each_rank_holds_a_fraction_of_the_weights(build, save_model, tmp_path):
    path = save_model(build(), external=True)
    total = _total_weights(path, tmp_path)
    for degree, most in ((2, 0.55), (4, 0.30)):
        plan = onnxshard.plan(path, tmp_path / f"tp{degree}", tensor_parallel=degree)
        (stage,) = plan.stages
        assert len(stage.rank_param_bytes) == degree
        assert max(stage.rank_param_bytes) <= most * total, (degree, stage.rank_param_bytes, total)


def test_row_splits_reference_the_weight_file_and_column_splits_are_copied(save_model, tmp_path):
    path = save_model(zoo.transformer(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", tensor_parallel=2)
    (stage,) = plan.stages
    refs = {}
    for rank in range(2):
        model = onnx.load(str(plan.root / stage.steps[0].files[rank]), load_external_data=False)
        model2 = onnx.load(str(plan.root / stage.steps[1].files[rank]), load_external_data=False)
        for t in list(model.graph.initializer) + list(model2.graph.initializer):
            info = {e.key: e.value for e in t.external_data}
            refs[(rank, t.name)] = (info.get("location"), int(info.get("offset", 0)))
    # fc2 [ffn, d] is split by rows: each rank points into the model's own (linked) weight file at its own offset.
    (loc0, off0), (loc1, off1) = refs[(0, "l0.fc2@tp0")], refs[(1, "l0.fc2@tp0")]
    assert loc0 == loc1 == "weights/model.onnx.data" and off1 - off0 == 32 * 32 * 4
    # fc1 [d, ffn] is split by columns: a streamed copy in the rank's own file.
    assert refs[(0, "l0.q@tp1")][0] == "weights/stage0.rank0.bin"
    assert refs[(1, "l0.q@tp1")][0] == "weights/stage0.rank1.bin"
    saved = json.loads((plan.root / "plan.json").read_text())
    assert saved["version"] == 3  # steps came in 2, weight digests in 3
    layout = saved["stages"][0]
    assert layout["tensor_parallel"] == 2 and {r["op"] for s in layout["steps"] for r in s["reduces"]} == {"sum"}
    annotated = [n for n in model.graph.node for c in n.device_configurations if c.configuration_id == "onnxshard.tp"]
    assert annotated and any(s.sharded_dim and s.sharded_dim[0].simple_sharding[0].num_shards == 2
                             for n in annotated for c in n.device_configurations for s in c.sharding_spec)


def test_fused_qkv_split_and_vocab_split_and_lm_head_gather(save_model, tmp_path):
    path = save_model(models.gpt2(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", tensor_parallel=2)
    (stage,) = plan.stages
    reduces = [r for s in stage.steps for r in s.reduces]
    assert any(r.op == "concat" and r.name == "logits" for r in reduces)  # LM head split by vocabulary columns
    assert any(r.op == "sum" and r.name == "tok" for r in reduces)  # embedding split by vocabulary rows
    # the causal mask, sliced with computed bounds (shape inference loses its dims), still broadcasts over the heads:
    # the scores stay split, one all-reduce per attention block and one per MLP, as in Megatron
    assert [r.name for r in reduces if r.op == "concat"] == ["logits"], reduces
    assert len(reduces) == 1 + 2 * 2 + 1
    # The fused QKV weight [64, 192] gives each rank its heads of Q, of K and of V: columns from all three blocks.
    dims = [t.dims for step in stage.steps if len(step.files) > 1
            for t in onnx.load(str(plan.root / step.files[1]), load_external_data=False).graph.initializer
            if t.name == "h0.c_attn@tp1.b64_64_64"]
    assert dims == [[64, 96]]
    assert not stage.notes


def test_too_few_heads_for_the_degree_falls_back_and_says_so(save_model, tmp_path):
    path = save_model(models.llama(heads=8, kv_heads=2), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", tensor_parallel=4)
    notes = plan.stages[0].notes
    assert notes and all("head count 2 cannot be split over tensor_parallel=4" in n and "valid degrees: 1 to 2" in n
                         for n in notes), notes
    assert "stays replicated" in plan.table()
    rel = _relative(tools.run_model(path, feeds := tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": 3})),
                    tools.run_stages(plan, feeds))
    assert max(rel.values()) <= 1e-4


def test_a_degree_that_splits_nothing_is_refused_and_nothing_is_written(save_model, tmp_path):
    path = save_model(zoo.transformer(d=32, heads=4, ffn=64), external=True)
    with pytest.raises(PlanError, match=r"splits no layer.*valid degrees"):
        onnxshard.plan(path, tmp_path / "plan", tensor_parallel=65)  # 4 heads, 64 hidden: 65 parts of neither
    assert not (tmp_path / "plan").exists()
    with pytest.raises(PlanError, match="at least 1"):
        onnxshard.plan(path, tmp_path / "plan", tensor_parallel=0)


def test_max_stage_memory_chooses_stages_and_degree_together(save_model, tmp_path):
    path = save_model(models.gpt2(), external=True)
    total = _total_weights(path, tmp_path)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=1, max_stage_memory=int(0.6 * total))
    assert plan.stages[0].tensor_parallel == 2 and plan.stages[0].param_bytes <= 0.6 * total
    with pytest.raises(PlanError, match="max-stage-memory"):
        onnxshard.plan(path, tmp_path / "plan2", stages=1, tensor_parallel=2, max_stage_memory=int(0.3 * total))


def test_copy_weights_with_tensor_parallelism_is_self_contained(save_model, tmp_path, monkeypatch):
    from onnxshard.partitioner import shards

    monkeypatch.setattr(shards, "CHUNK", 512)  # slices stream in pieces: rows up to 512 bytes batched, longer split
    path = save_model(models.llama(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", tensor_parallel=2, copy_weights=True)
    assert plan.weights.mode == "copy" and set(plan.weights.files) == {"weights/stage0.rank0.bin",
                                                                        "weights/stage0.rank1.bin"}
    feeds = tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": 3})
    reference = tools.run_model(path, feeds)
    path.unlink()
    (path.parent / "model.onnx.data").unlink()
    assert max(_relative(reference, tools.run_stages(onnxshard.load_plan(plan.root), feeds)).values()) <= 1e-4


def test_cli_plan_and_inspect_show_ranks(save_model, tmp_path):
    path = save_model(models.gpt2(), external=True)
    cli = [sys.executable, "-m", "onnxshard.cli"]
    out = subprocess.run(cli + ["plan", str(path), "--out", str(tmp_path / "plan"), "--stages", "2",
                                "--tensor-parallel", "2"], capture_output=True, text=True, check=True).stdout
    assert "/rank x2" in out and "reduces between ranks" in out
    out = subprocess.run(cli + ["inspect", str(tmp_path / "plan")], capture_output=True, text=True, check=True).stdout
    assert "weights per rank" in out
    run = subprocess.run(cli + ["verify", str(path), "--stages", "1", "--tensor-parallel", "3"], capture_output=True,
                         text=True)  # 4 heads and a vocabulary of 4096 over 3 ranks: uneven splits
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr
    run = subprocess.run(cli + ["verify", str(path), "--stages", "1", "--tensor-parallel", "5000"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "valid degrees" in run.stderr


@pytest.mark.parametrize("degree", [2, 3])
def test_ranks_linked_each_to_each_reduce_over_sockets(degree, save_model, tmp_path):
    """The direct transport's tensor-parallel stage, without Ray: plain stage workers of each rank linked by a
    mesh of Unix sockets; rank 0 hands each micro-batch to the others and returns the stage's result, equal to
    ORT's. A bad micro-batch fails on every rank, and the next one still runs (the ranks stay in step)."""
    import threading

    from onnxshard.runtime import arrow
    from onnxshard.workers.stage_worker import Failure, StageWorker

    path = save_model(models.bert_mlm(d=64, ffn=128, vocab=1001), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", tensor_parallel=degree)
    ranks = [StageWorker(str(plan.root), 0, rank=r) for r in range(degree)]
    addresses = [w.open_mesh(str(tmp_path), token=b"t" * 16) for w in ranks]
    joins = [threading.Thread(target=w.join_mesh, args=(addresses,)) for w in ranks]
    for t in joins:
        t.start()
    for t in joins:
        t.join(30)
    try:
        for micro_batch, seq in enumerate((5, 3)):
            feeds = tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": seq}, seed=micro_batch)
            feeds["ids"] = np.random.default_rng(micro_batch).integers(0, 1001, feeds["ids"].shape)
            batch = arrow.assemble([arrow.tensor_to_column(k, v) for k, v in feeds.items()])
            out, calls = ranks[0].run_ranks(ranks[0].check_mesh(), micro_batch, (batch, ()))
            got = arrow.decode(out, ["logits"])
            assert max(_relative(tools.run_model(path, feeds), got).values()) <= 1e-4
            assert {(c.rank, c.step) for c in calls} >= {(r, 0) for r in range(degree)}  # every rank's stats
        bad = arrow.assemble([arrow.tensor_to_column("ids", np.full((1, 4), 5000)),
                              arrow.tensor_to_column("mask", np.ones((1, 4), np.float32))])
        out, _ = ranks[0].run_ranks(ranks[0].check_mesh(), 2, (bad, ()))
        assert isinstance(out, Failure) and "out of" in out.message
        out, _ = ranks[0].run_ranks(ranks[0].check_mesh(), 3, (batch, ()))
        assert not isinstance(out, Failure)
    finally:
        for w in ranks:
            w._mesh.close()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("transport", ["auto", "ray"])
def test_pipeline_runs_rank_workers_on_ray(transport, save_model, tmp_path):
    path = save_model(models.gpt2(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=2, tensor_parallel=2)
    feeds = {"ids": np.random.default_rng(3).integers(0, 4096, (8, 6))}
    reference = tools.run_model(path, feeds)
    with Pipeline(plan, micro_batch_size=2, transport=transport) as pipe:
        assert pipe.transport == ("ray" if transport == "ray" else "direct")  # ranks reduce over sockets
        assert [len(ranks) for ranks in pipe.workers[0]] == [2, 2]
        assert len({w["pid"] for ranks in pipe.worker_info[0] for w in ranks}) == 4
        for _ in range(2):  # a second run reuses the same workers
            assert max(_relative(reference, pipe.run(feeds)).values()) <= 1e-4
        stats = pipe.stats
        with pytest.raises(InputError, match="'ids'"):
            pipe.run({"ids": feeds["ids"].astype(np.float32)})
        with pytest.raises(WorkerError, match=r"stage 0, micro-batch \d+.*rank \d step 0"):
            pipe.run({"ids": np.full((2, 6), 5000)})  # out of the vocabulary: ORT raises inside a rank's step
        assert max(_relative(reference, pipe.run(feeds)).values()) <= 1e-4  # still usable
    assert [s.ranks for s in stats.stages] == [2, 2] and all(s.reduce_s > 0 for s in stats.stages)
    assert {c.rank for c in stats.calls} == {0, 1}
    assert "stage 0 rank 1" in html_timeline(stats)  # a row per rank worker


@pytest.mark.usefixtures("ray_session")
def test_pipeline_mixes_split_and_whole_stages(save_model, tmp_path):
    path = save_model(zoo.multi_io(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=2, tensor_parallel=2)
    assert [s.tensor_parallel for s in plan.stages] == [2, 1]
    feeds = tools.random_feeds(plan.inputs, dims={"batch": 6}, seed=2)
    with pytest.warns(UserWarning, match="no batch dim"), Pipeline(plan, micro_batch_size=2) as pipe:
        assert max(_relative(tools.run_model(path, feeds), pipe.run(feeds)).values()) <= 1e-4


@pytest.mark.usefixtures("ray_session")
def test_a_lost_rank_worker_is_replaced_and_nothing_is_lost(save_model, tmp_path):
    path = save_model(models.llama(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=1, tensor_parallel=2)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((48, 4, 64)).astype(np.float32), "mask": np.ones((48, 4), np.float32)}
    reference = tools.run_model(path, feeds)
    with Pipeline(plan, micro_batch_size=1, replicas=2) as pipe:
        assert pipe.transport == "direct"
        fired = []

        def progress(done, submitted):
            if done >= 10 and not fired:
                fired.append(done)
                ray.kill(pipe.workers[1][0][1], no_restart=True)

        out = pipe.run(feeds, progress=progress)
        assert fired and pipe.recoveries and pipe.recoveries[0].stage == 0
        assert pipe.stats.delivered == 48
    assert max(_relative(reference, out).values()) <= 1e-4


ODD_VOCAB = {  # odd vocabularies, like GPT-2's 50,257 and BERT's 30,522 over most degrees
    "gpt2": lambda: models.gpt2(d=128, vocab=5003),
    "bert_mlm_tied": lambda: models.bert_mlm(d=128, ffn=512, vocab=5003),
    "bert_mlm": lambda: models.bert_mlm(d=128, ffn=512, vocab=5003, tied=False),
}


@pytest.mark.parametrize("name", sorted(ODD_VOCAB))
def test_uneven_splits_give_each_rank_its_share_of_every_large_weight(name, save_model, tmp_path):
    """A vocabulary (or head count) T does not divide is split unevenly, the masked-LM head's decoder and bias
    included, and an LM head tied to the embedding is one slice per rank: each rank holds at most 1/T of the
    weights plus the norms and biases every rank keeps."""
    path = save_model(ODD_VOCAB[name](), external=True)
    whole = _total_weights(path, tmp_path)
    for degree in (2, 3):
        plan = onnxshard.plan(path, tmp_path / f"tp{degree}", tensor_parallel=degree)
        (stage,) = plan.stages
        assert not stage.notes, stage.notes  # nothing of 1 MiB or more left whole
        assert max(stage.rank_param_bytes) <= whole / degree + 0.05 * whole, (degree, stage.rank_param_bytes, whole)
        offsets = _row_offsets(plan)
        assert offsets and all(len(set(v)) == degree for v in offsets.values()), offsets
        feeds = tools.random_feeds(plan.inputs, dims={"batch": 2, "seq": 5}, seed=3)
        feeds["ids"] = np.random.default_rng(3).integers(-5003, 5003, feeds["ids"].shape)
        assert max(_relative(tools.run_model(path, feeds), tools.run_stages(plan, feeds)).values()) <= 1e-4


def _row_offsets(plan) -> dict[str, list[int]]:
    """The vocabulary's per-rank row offsets, read back from the rank files."""
    (stage,) = plan.stages
    values: dict[str, list[int]] = {}
    for step in stage.steps:
        for file in step.files:
            for t in onnx.load(str(plan.root / file), load_external_data=False).graph.initializer:
                if t.name.endswith(".offset@rank"):
                    values.setdefault(t.name, []).append(int(onnx.numpy_helper.to_array(t)))
    return values


def test_a_large_weight_left_whole_is_named_with_its_bytes_and_why(save_model, tmp_path):
    # 4 heads over 5 ranks: the attention's 1 MiB Q/K/V projections stay whole, rolled back (the output
    # projection after them starts a split of its own)
    path = save_model(zoo.transformer(d=512, heads=4, ffn=1024), external=True)
    plan = onnxshard.plan(path, tmp_path / "heads", tensor_parallel=5)
    whole = [n for n in plan.stages[0].notes if n.startswith("weight ")]
    assert {n.split("'")[1] for n in whole} == {f"l{i}.{w}" for i in range(2) for w in "qkv"}, whole
    assert all("(1.0 MB) stays whole on every rank" in n and "rolled back" in n for n in whole), whole
    assert "stays whole on every rank" in plan.table()
    # a 1 MiB weight on the left of a MatMul: no rule splits it (the MLP after it splits)
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("left", (512, 512)), ("w1", (512, 512)), ("w2", (512, 512)))]
    nodes = [onnx.helper.make_node("MatMul", ["left", "x"], ["lx"]),
             onnx.helper.make_node("Transpose", ["lx"], ["t"], perm=[1, 0]),
             onnx.helper.make_node("MatMul", ["t", "w1"], ["h"]),
             onnx.helper.make_node("Relu", ["h"], ["r"]),
             onnx.helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = models.make_model(nodes, [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [512, "b"])],
                              [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 512])], weights)
    plan = onnxshard.plan(save_model(model, name="left", external=True), tmp_path / "left-plan", tensor_parallel=2)
    assert plan.stages[0].notes == ("weight 'left' (1.0 MB) stays whole on every rank: node 'MatMul_0' (MatMul) "
                                    "reads it whole; no tensor-parallel rule splits this use of it",)


def test_vocabulary_split_keeps_gather_semantics_for_negative_and_bad_ids(save_model, tmp_path):
    path = save_model(models.gpt2(), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", tensor_parallel=4)
    ids = np.array([[0, 1, 1023, 1024, 4095, -1, -4096]])  # rank edges, and ids counted from the end
    rel = _relative(tools.run_model(path, {"ids": ids}), tools.run_stages(plan, {"ids": ids}))
    assert max(rel.values()) <= 1e-4
    for bad in (4096, -4097):  # out of range: an error, as on the whole model, not a silent zero row
        with pytest.raises(InputError):
            tools.run_model(path, {"ids": np.array([[bad]])})
        with pytest.raises(WorkerError, match="out of"):
            tools.run_stages(plan, {"ids": np.array([[bad]])})


def test_sharded_inputs_are_carried_by_the_op_registry():
    from onnxshard.partitioner.tensor_parallel import RULES
    from onnxshard.partitioner.tensor_parallel.rules import CHANNELWISE, ELEMENTWISE, REDUCE, UNARY

    kept = {"MatMul", "Gemm", "Conv", "Transpose", "Reshape", "Expand", "Split", "Softmax", "LayerNormalization",
            "BatchNormalization", "Unsqueeze", "Squeeze", "Dropout", "Slice", "Gather", "Concat"}
    assert UNARY | ELEMENTWISE | CHANNELWISE | REDUCE | kept <= set(RULES)
    assert "TopK" not in RULES  # an op without a rule reads a sharded input whole

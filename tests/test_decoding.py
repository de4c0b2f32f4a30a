"""Generation's pure parts, without Ray: finding cache pairs, the recomputed prelude, the stage KV cache, the
continuous-batching rules and sampling."""

import numpy as np
import onnxruntime as ort
import pytest

import onnxshard
from onnxshard import decoder_models as dm
from onnxshard import partitioner
from onnxshard.distributed.decoding import (
    PREFILL_DEPTH,
    Ready,
    admit,
    next_step,
    room,
    step_groups,
    step_ids,
    step_inputs,
    turn_threads,
)
from onnxshard.errors import InputError, ModelError, PlanError, ResourceError
from onnxshard.partitioner.kv import find_pairs, uncuttable
from onnxshard.plans import TensorSpec
from onnxshard.runtime import arrow, tools
from onnxshard.runtime.kv_cache import CacheMiss, KvCache
from onnxshard.sampling import SamplingParams, choose, draw
from onnxshard.workers import StageWorker


def test_cache_pairs_are_found_by_name_refused_in_part_and_taken_from_a_map():
    inputs = ["input_ids", "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
              "past_key_values.1.value"]
    outputs = ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    pairs = find_pairs(inputs, outputs)
    assert [(p.layer, p.kind, p.past, p.present) for p in pairs][:2] == [
        (0, "key", "past_key_values.0.key", "present.0.key"), (0, "value", "past_key_values.0.value", "present.0.value")]
    assert len(pairs) == 4
    assert find_pairs(["x"], ["y"]) == ()
    with pytest.raises(ModelError, match=r"present\.1\.value.*no past/present partner"):
        find_pairs(inputs[:-1], outputs)
    mapped = find_pairs(["cache_in"], ["cache_out"], {"cache_in": "cache_out"})
    assert mapped[0].past == "cache_in" and mapped[0].present == "cache_out"
    with pytest.raises(ModelError, match="cache_typo"):
        find_pairs(["cache_in"], ["cache_out"], {"cache_typo": "cache_out"})


@pytest.mark.parametrize("build", [dm.gpt2_cached, dm.llama_cached])
@pytest.mark.parametrize("stages", [2, 3])
def test_later_stages_make_the_mask_and_rope_again_and_receive_only_the_hidden_state_and_small_inputs(
        save_model, tmp_path, build, stages):
    path = save_model(build(layers=3), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=stages)
    assert len(plan.kv_cache) == 6
    small = {"input_ids", "attention_mask", "position_ids"}
    kv_names = {n for p in plan.kv_cache for n in (p.past, p.present)}
    for stage in plan.stages[1:]:
        received = [n for n in stage.input_names if n not in kv_names and n not in small]
        assert len(received) <= 3, received  # the residual stream (and parts of a layer cut through), no prelude
        assert not {"attn_bias", "rope_cos", "rope_sin"} & set(stage.input_names)
    for pair in plan.kv_cache:  # each pair lives in one stage
        assert [s.index for s in plan.stages if pair.past in s.input_names] == \
            [s.index for s in plan.stages if pair.present in s.output_names]
    rng = np.random.default_rng(0)
    heads, hd = (4, 16) if build is dm.gpt2_cached else (2, 8)
    feeds = {"input_ids": rng.integers(0, 512, (2, 3)), "attention_mask": np.array([[0, 1, 1, 1, 1], [1] * 5]),
             "position_ids": np.array([[1, 2, 3], [2, 3, 4]])}
    feeds.update({p.past: rng.standard_normal((2, heads, 2, hd)).astype(np.float32) for p in plan.kv_cache})
    differences = tools.max_differences(tools.run_model(path, feeds), tools.run_stages(plan, feeds))
    assert max(differences.values()) < 1e-4 and len(differences) == 7


@pytest.mark.parametrize("build", [dm.gpt2_cached, dm.llama_cached])
def test_no_stage_ends_between_a_layers_cache_and_the_attention_over_it(save_model, tmp_path, build):
    path = save_model(build(layers=3), external=True)
    analysis = partitioner.analyse_model(path)
    graph = analysis.graph
    spans = uncuttable(graph, find_pairs(graph.inputs, graph.outputs))
    assert sorted(present for _, _, present in spans) == sorted(f"present.{i}.{k}" for i in range(3)
                                                                 for k in ("key", "value"))
    for first, last, present in spans:  # from the key (value) projection to the attention's output projection
        for at in (first - 1, last):
            assert graph.nodes[at].op_type in ("MatMul", "Gemm") and any(r in graph.initializers
                                                                         for r in graph.reads[at])
        assert first <= graph.producer[present] < last  # the concat that makes the present lies inside
    # costs whose one balance point lies in the middle of layer 1's attention (every node costs 1, and the first or
    # the last node more, to move that point there): the cut moves out of the span, never into it
    first, last, present = next(s for s in spans if s[2] == "present.1.value")
    middle, n = (first + last) // 2, len(graph.nodes)
    times = {node.name: 1.0 for node in graph.nodes}
    times[graph.nodes[0].name] += max(0, n - 2 * middle)
    times[graph.nodes[-1].name] += max(0, 2 * middle - n)
    plan = partitioner.partition(analysis, tmp_path / "steered", stages=2, node_times=times)
    kv_names = {n for p in plan.kv_cache for n in (p.past, p.present)}
    assert not {p.present for p in plan.kv_cache} & set(plan.stages[1].input_names)
    received = set(plan.stages[1].input_names) - kv_names - {"input_ids", "attention_mask", "position_ids"}
    assert received and all(graph.producer[n] < first - 1 or graph.producer[n] >= last for n in received), received
    # a cut given by hand inside it is refused, naming the cache; one right after the projection is taken
    with pytest.raises(PlanError, match=r"falls inside the attention over 'present\.1\.(key|value)'"):
        onnxshard.plan(path, tmp_path / "inside", cuts=[graph.nodes[middle].output[0]])
    after = onnxshard.plan(path, tmp_path / "after", cuts=[graph.nodes[last].output[0]])
    assert after.num_stages == 2


def _specs(heads=2, hd=4):
    return {name: TensorSpec(name, "float32", ("batch", heads, "past", hd)) for name in ("past.k", "past.v")}


def _pairs():
    return find_pairs(["past.k", "past.v"], ["present.k", "present.v"], {"past.k": "present.k", "past.v": "present.v"})


def test_the_cache_pads_rows_on_the_left_and_keeps_them_without_the_padding():
    cache = KvCache(_pairs(), _specs())
    assert cache.token_bytes == 2 * 2 * 4 * 4
    rng = np.random.default_rng(1)
    # a prefill of 3 tokens for "a" and 1 for "b" in separate calls, then one decode call with both rows
    a3 = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    b1 = rng.standard_normal((1, 2, 1, 4)).astype(np.float32)
    assert cache.feeds(["a"], [0])["past.k"].shape == (1, 2, 0, 4)
    cache.keep(["a"], [0], {"present.k": a3, "present.v": -a3})
    cache.keep(["b"], [0], {"present.k": b1, "present.v": -b1})
    past = cache.feeds(["a", "b"], [3, 1])
    assert past["past.k"].shape == (2, 2, 3, 4)
    assert np.array_equal(past["past.k"][0], a3[0]) and np.array_equal(past["past.v"][1, :, 2:], -b1[0])
    assert not past["past.k"][1, :, :2].any()  # padding
    present = np.concatenate([past["past.k"], rng.standard_normal((2, 2, 1, 4)).astype(np.float32)], axis=2)
    cache.keep(["a", "b"], [3, 1], {"present.k": present, "present.v": present})
    assert cache.length("a") == 4 and cache.length("b") == 2
    again = cache.feeds(["a", "b"], [4, 2])  # the same rows in the same order: last step's presents as they are
    assert again["past.k"] is present
    swapped = cache.feeds(["b", "a"], [2, 4])  # another order: gathered, the same values
    assert np.array_equal(swapped["past.k"][0, :, 2:], present[1, :, 2:]) and not swapped["past.k"][0, :, :2].any()
    assert np.array_equal(swapped["past.k"][1], present[0])
    assert np.array_equal(cache.feeds(["b"], [2])["past.k"][0], present[1, :, 2:])
    assert cache.used_bytes == 6 * cache.token_bytes
    with pytest.raises(CacheMiss, match="holds 2 cached tokens, the call expects 5"):
        cache.feeds(["b"], [5])
    cache.free(["a"])
    with pytest.raises(CacheMiss, match="holds 0 cached tokens"):
        cache.feeds(["a"], [4])
    assert len(cache) == 1


def test_the_cache_refuses_to_pass_its_cap_and_keeps_what_it_held():
    cache = KvCache(_pairs(), _specs(), capacity_bytes=5 * 64)
    x = np.ones((1, 2, 4, 4), np.float32)
    cache.keep(["a"], [0], {"present.k": x, "present.v": x})
    with pytest.raises(ResourceError, match="over kv_cache_memory"):
        cache.keep(["b"], [0], {"present.k": x[:, :, :2], "present.v": x[:, :, :2]})
    assert cache.length("a") == 4 and cache.length("b") == 0


def test_a_stage_worker_sends_on_the_hidden_state_and_small_inputs_per_decode_step(save_model, tmp_path):
    """What crosses the cut per decode step: the hidden state [rows, 1, d] and the ids, the same whatever the
    context length; the caches stay in the worker, which makes the mask and positions itself; inspect says so."""
    d = 64
    path = save_model(dm.llama_cached(layers=2, d=d), external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", cuts=["layers.0.out"])
    first = StageWorker(str(plan.root), 0)
    first.open_cache()
    sent = {}
    for context in (8, 40):
        rows = [Ready("a", context, 0), Ready("b", context, 0)]
        tokens = [list(range(context + 1)), list(range(1, context + 2))]
        step = {"seqs": ["a", "b"], "lengths": [0, 0], "new": context}
        prefill = first.generate_step(arrow.encode({"input_ids": step_ids(tokens, rows)}), step)
        assert arrow.decode(prefill)["layers.0.out"].shape == (2, context, d)
        rows = [Ready("a", 1, context), Ready("b", 1, context)]
        step = {"seqs": ["a", "b"], "lengths": [context, context], "new": 1}
        out = first.generate_step(arrow.encode({"input_ids": step_ids(tokens, rows)}), step)
        sent[context] = {name: value.nbytes for name, value in arrow.decode(out).items()}
        first.free_cache(["a", "b"])
    for columns in sent.values():  # the next stage makes the mask and positions from the lengths itself
        assert columns == {"layers.0.out": 2 * d * 4, "input_ids": 2 * 8}  # a new token's hidden state and id per row
    assert sent[40] == sent[8]
    text = plan.boundaries()
    assert f"stage 0: the cache of 1 layer, 128 B per token; sends {d * 4 + 8} B (layers.0.out {d * 4} B, input_ids 8 B)" \
        in text


def test_prefills_go_first_and_decodes_are_dealt_into_as_many_groups_as_stages():
    ready = [Ready("a", 1, 10), Ready("b", 5, 0), Ready("c", 1, 3), Ready("d", 5, 0), Ready("e", 7, 0)]
    assert [r.seq for r in next_step(ready, 5, 2, 32, 2048)] == ["b", "d"]  # equal prompt lengths together
    assert [r.seq for r in next_step(ready, 5, 2, 32, 9)] == ["b"]  # within the prefill token budget
    decodes = [Ready(s, 1, 4) for s in "abcdefgh"]
    sizes = {stages: len(next_step(decodes, 8, stages, 32, 2048)) for stages in (1, 2, 3, 4)}
    assert sizes == {1: 8, 2: 4, 3: 3, 4: 2}  # the rule follows the stage count
    assert len(next_step(decodes, 8, 1, 5, 2048)) == 5  # capped by max_rows
    assert len(next_step(decodes[:1], 8, 4, 32, 2048)) == 1
    assert next_step([], 3, 2, 32, 2048) == []


def test_prefill_steps_may_queue_deeper_than_decode_steps():
    prefill, decode = [Ready("a", 9, 0)], [Ready("b", 1, 9), Ready("c", 1, 4)]
    for stages in (1, 2, 3):
        # a decode step per stage at most: each group waits for its last tokens
        assert [room(decode, n, stages) for n in range(stages + 1)] == [True] * stages + [False]
        # prefills of other sequences queue deeper, so a stage done with a short prompt finds the next one waiting
        depth = PREFILL_DEPTH * stages
        assert [room(prefill, n, stages) for n in range(depth + 1)] == [True] * depth + [False]
    assert PREFILL_DEPTH > 1
    assert not room([], 0, 2)
    for rows in (prefill, decode):  # stages taking turns: one step of any kind in flight, whatever the stage count
        assert [room(rows, n, 3, turns=True) for n in range(3)] == [True, False, False]


def test_stages_take_turns_only_on_one_nodes_cpus_with_the_cpus_they_reserved_together():
    assert turn_threads(["n1", "n1"], 1.0, 0, 1) == 2
    assert turn_threads(["n1", "n1", "n1"], 1.5, 0, 1) == 4  # 4.5 CPUs reserved: ORT takes whole threads
    assert turn_threads(["n1", "n1"], 0.25, 0, 1) == 1
    assert turn_threads(["n1", "n2"], 1.0, 0, 1) is None  # on two nodes each stage has cores of its own
    assert turn_threads(["n1", "n1"], 1.0, 0.5, 1) is None  # a GPU each
    assert turn_threads(["n1", "n1"], 1.0, 0, 2) is None  # tensor-parallel ranks run together
    decodes = [Ready(s, 1, 4) for s in "abcdefgh"]
    # taking turns, every running sequence is in the one decode step; else a stage's share
    assert [len(next_step(decodes, 8, step_groups(3, turns), 32, 2048)) for turns in (True, False)] == [8, 3]


def test_step_inputs_pad_the_cache_on_the_left_and_number_positions_per_row():
    tokens = [[5, 6, 7, 8], [9, 10]]
    feeds = step_inputs(tokens, [Ready("a", 1, 3), Ready("b", 1, 1)])
    assert feeds["input_ids"].tolist() == [[8], [10]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert feeds["position_ids"].tolist() == [[3], [1]]
    prefill = step_inputs([[1, 2, 3]], [Ready("c", 3, 0)])
    assert prefill["attention_mask"].tolist() == [[1, 1, 1]] and prefill["position_ids"].tolist() == [[0, 1, 2]]


def test_admission_waits_for_room_and_refuses_what_never_fits():
    assert admit(10, 0, None).verdict == "admit"
    assert admit(10, 80, 100).verdict == "admit"
    assert admit(10, 95, 100).verdict == "wait"
    refused = admit(150, 0, 100)
    assert refused.verdict == "refuse" and "150 tokens" in refused.why and "100" in refused.why


def test_sampling_is_greedy_at_zero_temperature_reproducible_with_a_seed_and_narrowed_by_top_k_and_top_p():
    logits = np.random.default_rng(3).standard_normal(50)
    best = int(np.argmax(logits))
    assert choose(logits, SamplingParams(), 0.7) == best
    assert choose(logits, SamplingParams(temperature=1.0, top_k=1), 0.7) == best
    assert choose(logits, SamplingParams(temperature=1.0, top_p=1e-6), 0.99) == best
    assert draw(SamplingParams(), np.random.default_rng()) == 0.0  # greedy draws nothing
    params = SamplingParams(temperature=1.5, seed=7)
    draws = lambda p: [choose(logits, p, draw(p, rng)) for rng in [p.generator()] for _ in range(20)]  # noqa: E731
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=1.5, seed=8))
    assert len(set(draws(params))) > 3  # it does sample
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert set(draws(SamplingParams(temperature=5.0, top_k=3, seed=1))) <= top3
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)):
        with pytest.raises(InputError, match=next(iter(bad))):
            SamplingParams(**bad)


@pytest.mark.parametrize("build", [dm.gpt2_cached, dm.llama_cached])
def test_the_zoo_decoders_cache_equals_recomputing_the_whole_sequence(save_model, build):
    session = ort.InferenceSession(str(save_model(build())), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
             if i.name.startswith("past")}

    def run(ids, past, cached):
        total = cached + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(cached, total)[None], **past}
        return dict(zip(names, session.run(None, feeds)))

    ids = np.array([[5, 9, 2, 7]])
    whole = run(ids, empty, 0)["logits"]
    first = run(ids[:, :3], empty, 0)
    last = run(ids[:, 3:], {k: first[k.replace("past_key_values", "present")] for k in empty}, 3)["logits"]
    assert np.abs(whole[:, 3:] - last).max() < 1e-4 and np.abs(whole[:, :3] - first["logits"]).max() < 1e-4
    assert len(set(np.argmax(whole[0], -1).tolist())) > 1  # not a degenerate model


def test_cache_pairs_named_otherwise_are_given_on_the_command_line(save_model, tmp_path, capsys):
    from onnxshard.cli import main
    from onnxshard.plans import Plan

    model = dm.llama_cached(layers=1)
    names = {"past_key_values.0.key": "k_in", "past_key_values.0.value": "v_in", "present.0.key": "k_out",
             "present.0.value": "v_out"}
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in list(model.graph.input) + list(model.graph.output):
        value.name = names.get(value.name, value.name)
    path = save_model(model)
    assert main(["plan", str(path), "--out", str(tmp_path / "plain"), "--stages", "2"]) == 0
    assert Plan.load(tmp_path / "plain").kv_cache == ()  # nothing to match by name: not a decoder to onnxshard
    assert main(["plan", str(path), "--out", str(tmp_path / "p"), "--stages", "2", "--kv-pair", "k_in=k_out",
                 "--kv-pair", "v_in=v_out"]) == 0
    assert [(p.past, p.present) for p in Plan.load(tmp_path / "p").kv_cache] == [("k_in", "k_out"), ("v_in", "v_out")]
    assert main(["plan", str(path), "--out", str(tmp_path / "bad"), "--kv-pair", "k_in"]) == 2
    assert "--kv-pair" in capsys.readouterr().err

"""Generation on Ray: greedy tokens equal a plain ONNX Runtime loop with its cache on the whole model, sampling is
reproducible, the cache cap makes sequences wait, and a killed stage worker changes no token."""

import dataclasses
import threading
import time

import actors
import numpy as np
import onnxruntime as ort
import pytest
import ray

import onnxshard
from onnxshard import decoder_models as dm
from onnxshard.distributed.generator import Generator
from onnxshard.errors import InputError, PlanError
from onnxshard.plans import TensorSpec
from onnxshard.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("ray_session")
BUILDERS = {"gpt2": dm.gpt2_cached, "llama": dm.llama_cached}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Each zoo decoder, 3 layers, saved with external weights and planned into 2 and 3 stages."""
    out = {}
    for name, build in BUILDERS.items():
        folder = tmp_path_factory.mktemp(name)
        path = onnxshard.models.save(build(layers=3), folder / "model", external=True)
        out[name] = (path, {k: onnxshard.plan(path, folder / f"plan{k}", stages=k) for k in (2, 3)})
    return out


def ort_greedy(path, prompt, max_tokens, provider="CPUExecutionProvider"):
    """The reference: one plain ORT session on the whole model, one sequence, its cache fed back each step."""
    session = ort.InferenceSession(str(path), providers=[provider])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values")}
    tokens, cached, out = list(prompt), 0, []
    for _ in range(max_tokens):
        feeds = {"input_ids": np.array([tokens[cached:]]), "attention_mask": np.ones((1, len(tokens)), np.int64),
                 "position_ids": np.arange(cached, len(tokens))[None], **past}
        result = dict(zip(names, session.run(None, feeds)))
        past = {name: result[name.replace("past_key_values", "present")] for name in past}
        cached = len(tokens)
        token = int(np.argmax(result["logits"][0, -1]))
        out.append(token)
        tokens.append(token)
    return out


def _prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, 2 + 3 * i).tolist() for i in range(count)]  # lengths 2, 5, 8, ...


def _wait_for_tokens(seq, count, timeout=60):
    end = time.monotonic() + timeout
    while len(seq.tokens) < count and not seq.done:
        assert time.monotonic() < end, f"no {count} tokens within {timeout} s"
        time.sleep(0.005)


def _assert_caches_empty(gen, timeout=30):
    """Every stage worker's cache is empty (frees travel behind the last steps: wait for them)."""
    end = time.monotonic() + timeout
    while (held := ray.get([ranks[0].free_cache.remote([]) for ranks in gen.placement.workers[0]], timeout=30)) != \
            [0] * gen.plan.num_stages:
        assert time.monotonic() < end, f"caches still hold {held} bytes"
        time.sleep(0.02)


@pytest.mark.parametrize("model,stages,transport,turns", [
    ("gpt2", 2, "direct", True), ("gpt2", 3, "direct", False), ("llama", 2, "direct", False),
    ("llama", 2, "direct", True), ("llama", 3, "direct", True), ("llama", 3, "ray", False)])
def test_greedy_tokens_equal_plain_onnxruntime_with_eight_sequences_joining_at_different_times(
        decoders, model, stages, transport, turns):
    path, plans = decoders[model]
    prompts = _prompts(8)
    lengths = [12, 5, 9, 16, 3, 11, 7, 14]
    expected = [ort_greedy(path, p, n) for p, n in zip(prompts, lengths)]
    with Generator(plans[stages], cpus_per_stage=0.5, transport=transport, take_turns=turns) as gen:
        assert gen.transport == transport
        # one node: taking turns, each stage runs the threads all of them reserved (0.5 CPU each), else its own
        assert gen.turns is turns
        assert [w[0]["threads"] for w in gen.placement.info[0]] == [round(0.5 * stages) if turns else 1] * stages
        configs = ray.get([w[0].__ray_call__.remote(lambda worker: worker.config) for w in gen.placement.workers[0]])
        assert [c.turns for c in configs] == [turns] * stages  # their threads stop spinning as each run ends
        seqs = []
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            seqs.append(gen.submit(prompt, SamplingParams(max_tokens=n)))
            if i % 3 == 2:  # the later ones join while the earlier ones decode
                _wait_for_tokens(seqs[0], i)
        got = [s.result(timeout=120) for s in seqs]
        assert [s.finish_reason for s in seqs] == ["length"] * 8
        stats = gen.stats
        assert stats["peak_running"] > 1 and max(gen.step_rows) > 1  # sequences shared steps
        _assert_caches_empty(gen)
    for want, have in zip(expected, got):
        assert have == want


def test_streaming_yields_the_tokens_in_order_and_stop_tokens_and_eos_end_a_sequence(decoders):
    path, plans = decoders["llama"]
    prompt = _prompts(3)[2]
    expected = ort_greedy(path, prompt, 12)
    with Generator(plans[2], cpus_per_stage=0.5) as gen:
        seq = gen.submit(prompt, SamplingParams(max_tokens=12))
        assert list(seq.stream(timeout=60)) == expected == seq.result()
        stop = gen.submit(prompt, SamplingParams(max_tokens=12, stop_token_ids=(expected[4],)))
        cut = expected.index(expected[4]) + 1
        assert stop.result(60) == expected[:cut] and stop.finish_reason == "stop"
        eos = gen.submit(prompt, SamplingParams(max_tokens=12, eos_token_id=expected[3]))
        assert eos.result(60) == expected[:expected.index(expected[3])] and eos.finish_reason == "stop"
        ignored = gen.submit(prompt, SamplingParams(max_tokens=12, eos_token_id=expected[3], ignore_eos=True))
        assert ignored.result(60) == expected


def test_seeded_sampling_is_reproducible_whatever_it_is_batched_with(decoders):
    _, plans = decoders["gpt2"]
    prompts = _prompts(4, seed=3)
    params = SamplingParams(max_tokens=10, temperature=1.2, top_k=50, top_p=0.95, seed=11)
    with Generator(plans[2], cpus_per_stage=0.5) as gen:
        alone = gen.generate([prompts[0]], params)[0]
        together = gen.generate(prompts, [params] + [SamplingParams(max_tokens=6, temperature=0.8, seed=i)
                                                     for i in range(3)])
        other_seed = gen.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=1.2, top_k=50, top_p=0.95,
                                                               seed=12))[0]
        greedy = gen.generate([prompts[0]], SamplingParams(max_tokens=10))[0]
    assert together[0] == alone
    assert other_seed != alone and greedy != alone  # the seed matters, and it does sample


def test_the_cache_cap_makes_sequences_wait_and_refuses_one_that_never_fits(decoders):
    path, plans = decoders["llama"]
    plan = plans[2]
    prompts = _prompts(5)[:5]
    need = [len(p) + 6 for p in prompts]
    pair_bytes = 2 * 8 * 4  # kv_heads x head_dim x float32, per token, per key or value
    most_pairs = max(sum(1 for p in plan.kv_cache if p.past in s.input_names) for s in plan.stages)
    cap = (need[-1] + need[-2]) * most_pairs * pair_bytes  # room for the two longest at once
    expected = [ort_greedy(path, p, 6) for p in prompts]
    with Generator(plan, cpus_per_stage=0.5, kv_cache_memory=cap) as gen:
        assert gen.capacity_tokens == need[-1] + need[-2]
        got = gen.generate(prompts, SamplingParams(max_tokens=6), timeout=120)
        assert 2 <= gen.peak_running < 5  # some waited
        with pytest.raises(InputError, match=r"kv_cache_memory holds \d+ tokens"):
            gen.submit(prompts[0], SamplingParams(max_tokens=gen.capacity_tokens))
        _assert_caches_empty(gen)
    assert got == expected


@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_a_killed_stage_worker_changes_no_token(decoders, transport):
    path, plans = decoders["llama"]
    prompts = _prompts(6)
    expected = [ort_greedy(path, p, 20) for p in prompts]
    with Generator(plans[3], cpus_per_stage=0.5, transport=transport) as gen:
        seqs = [gen.submit(p, SamplingParams(max_tokens=20)) for p in prompts]
        stream = seqs[-1].stream(timeout=60)
        got_last = [next(stream) for _ in range(4)]
        victim = gen.placement.workers[0][1][0]
        killer = threading.Thread(target=actors.kill, args=(victim,))
        killer.start()
        got_last += list(stream)
        killer.join()
        got = [s.result(timeout=120) for s in seqs[:-1]] + [got_last]
        assert gen.recoveries, "the kill landed after every sequence had finished"
        _assert_caches_empty(gen)
    assert got == expected


def test_bad_prompts_and_plans_are_refused_by_name(decoders, tmp_path, save_model):
    _, plans = decoders["gpt2"]
    with Generator(plans[2], cpus_per_stage=0.5, max_model_len=20) as gen:
        with pytest.raises(InputError, match="at most 20"):
            gen.submit(list(range(20)))
        with pytest.raises(InputError, match="empty"):
            gen.submit([])
        clipped = gen.submit(list(range(15)), SamplingParams(max_tokens=50))
        assert len(clipped.result(60)) == 5 and clipped.finish_reason == "length"
    plain = onnxshard.plan(save_model(onnxshard.models.transformer()), tmp_path / "plain", stages=2)
    with pytest.raises(PlanError, match="no KV cache"):
        Generator(plain)
    plan = plans[2]  # as an older planner could cut it: a present made in stage 0 and sent on to stage 1
    present = next(p.present for p in plan.kv_cache if p.present in plan.stages[0].output_names)
    second = dataclasses.replace(plan.stages[1], inputs=(*plan.stages[1].inputs, TensorSpec(present, "float32")))
    with pytest.raises(PlanError, match=rf"{present}.*sent on to stage\(s\) \[1\]"):
        Generator(dataclasses.replace(plan, stages=(plan.stages[0], second)))


def test_the_generate_command_takes_text_and_token_ids(decoders, capsys):
    import json

    from onnxshard.cli import main
    from onnxshard.text import TextCodec

    path, plans = decoders["gpt2"]
    dm.save_tokenizer(path.parent)  # beside the model, where the command looks
    codec = TextCodec.load(path.parent)
    want = ort_greedy(path, codec.encode("w30 w31 w32"), 6)
    assert main(["generate", str(plans[2].root), "--prompt", "w30 w31 w32", "--ids", "30,31,32", "--max-tokens", "6",
                 "--cpus-per-stage", "0.5", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["token_ids"] for line in lines] == [want, want]
    assert lines[0]["text"] == codec.decode(want) and lines[0]["finish_reason"] == "length"
    assert main(["generate", str(plans[2].root), "--prompt", "w30 w31 w32", "--max-tokens", "6", "--cpus-per-stage",
                 "0.5", "--stop", codec.decode(want[2:4])]) == 0
    assert capsys.readouterr().out == codec.decode(want).split(codec.decode(want[2:4]))[0] + "\n"
    assert main(["generate", str(plans[2].root), "--ids", "1,x"]) == 2
    assert "--ids" in capsys.readouterr().err

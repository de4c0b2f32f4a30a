"""The OpenAI-compatible routes on the Serve app, through the real ``openai`` client on loopback: completions, chat
and streaming equal a plain ONNX Runtime greedy loop, and bad requests get OpenAI's error shape."""

import json

import pytest
import requests
import zoo
from test_generation import ort_greedy
from test_serve import _free_port

from onnxshard import decoder_models as dm
from onnxshard.text import TextCodec

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """A repository of a decoder (with its tokenizer and chat template) and a plain MLP, behind an API key."""
    import os

    from ray import serve

    from onnxshard.serve import build_app

    repo = tmp_path_factory.mktemp("repo")
    path = zoo.save(dm.llama_cached(layers=2), repo / "llama", external=True)
    dm.save_tokenizer(repo / "llama")
    zoo.save(zoo.mlp(layers=2), repo / "mlp")
    os.environ["ONNXSHARD_TEST_KEY"] = KEY
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"repository": str(repo), "cpus_per_stage": 0.5, "api_key_env": "ONNXSHARD_TEST_KEY",
                         "max_model_len": 512, "max_body_size": 4096}), name="onnxshard", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "path": path, "codec": TextCodec.load(repo / "llama")}
    serve.shutdown()  # the next module starts Serve on ports of its own


def _client(served, key=KEY):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def test_models_completions_and_streaming_through_the_openai_client(served):
    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["llama"]  # the MLP is no decoder
    codec = served["codec"]
    prompt = "w11 w42 w7 w300"
    want = ort_greedy(served["path"], codec.encode(prompt), 12)
    done = client.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == codec.decode(want)
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (4, 12, 16)
    assert done.choices[0].model_extra["token_ids"] == want
    chunks = list(client.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == codec.decode(want)
    assert chunks[-1].usage.completion_tokens == 12 and len(chunks) > 5  # one chunk per token or so
    ids = client.completions.create(model="llama", prompt=codec.encode(prompt), max_tokens=12, temperature=0)
    assert ids.choices[0].model_extra["token_ids"] == want


def test_chat_applies_the_template_and_streams_deltas(served):
    client = _client(served)
    codec = served["codec"]
    messages = [{"role": "user", "content": "w9 w10 w11"}]
    want = ort_greedy(served["path"], codec.encode(codec.chat_prompt(messages), special=False), 10)
    reply = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == codec.decode(want)
    stream = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == codec.decode(want)
    stop_at = codec.decode(want[3:5])
    stopped = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0,
                                             stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == codec.decode(want).split(stop_at)[0]


def test_seeded_sampling_over_http_is_reproducible(served):
    client = _client(served)
    ask = dict(model="llama", prompt="w5 w6", max_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    first = client.completions.create(**ask).choices[0].text
    assert client.completions.create(**ask).choices[0].text == first
    assert client.completions.create(**{**ask, "seed": 5}).choices[0].text != first


def test_bad_requests_get_the_openai_error_shape_and_the_server_stays_up(served):
    import openai

    client = _client(served)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="w5", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt=" ".join(["w5"] * 600), max_tokens=2)
    assert e.value.body["param"] == "prompt" and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="w5", max_tokens=-3)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="mlp", prompt="w5", max_tokens=2)
    assert "not a decoder" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        _client(served, key="wrong-key-000").completions.create(model="llama", prompt="w5", max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = requests.post(served["url"] + "/v1/completions", data=b"{not json", headers=headers, timeout=30)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    big = requests.post(served["url"] + "/v1/completions", headers=headers, timeout=30,
                        data=json.dumps({"model": "llama", "prompt": "w5 " * 3000}))  # 9 kB, over 4096 B
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    for body, param in (({"model": "llama", "prompt": "w5", "n": 2}, "n"),
                        ({"model": "llama", "prompt": "w5", "temperature": "hot"}, "temperature"),
                        ({"model": "llama", "messages": "hi"}, "messages"),
                        ({"model": "llama", "prompt": "w5", "logprobs": 2}, "logprobs")):
        route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        answer = requests.post(served["url"] + route, headers=headers, data=json.dumps(body), timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert _client(served).completions.create(model="llama", prompt="w5", max_tokens=2).choices[0].text


def test_a_client_that_goes_away_mid_stream_frees_its_sequence(served):
    import time

    from ray import serve

    model = serve.get_deployment_handle("model-llama", app_name="onnxshard")
    headers = {"Authorization": f"Bearer {KEY}"}
    with requests.post(served["url"] + "/v1/completions", headers=headers, stream=True, timeout=30,
                       json={"model": "llama", "prompt": "w5 w6", "max_tokens": 500, "stream": True,
                             "ignore_eos": True}) as r:  # sampled, an early EOS would end it before the check
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        first = next(lines)
        assert first.startswith(b'data: {"id":'), first
        stats = model.generation_stats.remote().result()
        assert stats["running"] == 1, str(stats)  # 500 steps take seconds
    deadline = time.monotonic() + 20
    while model.generation_stats.remote().result()["running"]:  # the server notices at its next write
        assert time.monotonic() < deadline, "the sequence of a closed stream still runs"
        time.sleep(0.05)
    assert model.generation_stats.remote().result()["aborted"] >= 1


def test_one_decoder_plan_served_by_the_ingress_alone(served, tmp_path):
    """A single model: the ingress replica owns its generator (no model deployment); its plan's folder holds
    no tokenizer, the model's does."""
    from ray import serve

    import onnxshard
    from onnxshard.serve import build_app

    path = zoo.save(dm.gpt2_cached(layers=2), tmp_path / "gpt2", external=True)
    dm.save_tokenizer(tmp_path / "gpt2")
    onnxshard.plan(path, tmp_path / "gpt2-plan", stages=3)
    serve.run(build_app({"plan_dir": str(tmp_path / "gpt2-plan"), "cpus_per_stage": 0.5}), name="solo",
              route_prefix="/solo")
    try:
        import openai

        client = openai.OpenAI(base_url=served["url"] + "/solo/v1", api_key="none", max_retries=0, timeout=60)
        codec = TextCodec.load(tmp_path / "gpt2")
        want = codec.decode(ort_greedy(path, codec.encode("w20 w21 w22"), 9))
        stream = client.completions.create(model="gpt2-plan", prompt="w20 w21 w22", max_tokens=9, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream) == want
        assert set(serve.status().applications["solo"].deployments) == {"kserve-ingress"}
    finally:
        serve.delete("solo")

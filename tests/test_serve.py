"""The Serve application on loopback, through the real Triton clients (HTTP and gRPC) and raw HTTP: health,
metadata, inference equal to plain ORT, concurrency with dynamic batching, bad input, the API key, the body
limit, a full queue, and a stage worker killed under load. One app serves a repository of three models."""

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import requests
import zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxshard

KEY = "test-key-0123456789"


def auth() -> dict:
    """The API key header, a new dict each call: tritonclient.http adds Inference-Header-Content-Length to the
    dict it is given."""
    return {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case

TYPES = {"x": "FP32", "mask": "BOOL", "ids": "INT64", "label": "BYTES"}
MAX_BODY = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """A repository: ``typed`` (a plan: FP32, BOOL, INT64 and BYTES tensors), ``mlp`` (a bare model, planned by
    its replica) and ``small`` (an mlp with a queue of 2 and no batching, to fill)."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from onnxshard.serve import GRPC_SERVICER, build_app

    root = tmp_path_factory.mktemp("serve")
    typed = zoo.save(zoo.typed_io(), root / "src" / "typed")
    onnxshard.plan(typed, root / "repo" / "typed", stages=2)
    mlp = zoo.save(zoo.mlp(), root / "repo" / "mlp")
    (root / "repo" / "small").mkdir()
    shutil.copy(mlp, root / "repo" / "small" / "model.onnx")
    (root / "repo" / "small" / "serve.json").write_text(json.dumps({"max_queue_size": 2, "max_batch_size": 1}))
    os.environ["ONNXSHARD_TEST_KEY"] = KEY
    http, grpc = _free_port(), _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http},
                grpc_options=gRPCOptions(port=grpc, grpc_servicer_functions=[GRPC_SERVICER]))
    serve.run(build_app({"repository": str(root / "repo"), "api_key_env": "ONNXSHARD_TEST_KEY",
                         "max_body_size": MAX_BODY, "max_queue_delay_ms": 5}), name="onnxshard", route_prefix="/")
    yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "typed": str(typed), "mlp": str(mlp)}
    serve.shutdown()


def _handle(model: str):
    from ray import serve

    return serve.get_deployment_handle(f"model-{model}", app_name="onnxshard")


def _typed_feeds(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 16), dtype=np.float32), "mask": rng.random((n, 16)) > 0.3,
            "ids": rng.integers(-5, 5, (n, 4)), "label": np.array([f"s{i}é" for i in range(n)], dtype=object)}


def _ort(path: str, feeds: dict) -> dict:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _triton_inputs(module, feeds: dict, binary: bool):
    inputs = []
    for name, value in feeds.items():
        tensor = module.InferInput(name, list(value.shape), TYPES.get(name, "FP32"))
        if module.__name__.endswith("http"):
            tensor.set_data_from_numpy(value, binary_data=binary)
        else:
            tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def test_ray_serve_and_both_triton_clients_import_together():
    import ray.serve  # noqa: F401 - tritonclient[grpc]'s protobuf pin would break this import
    import tritonclient.grpc
    import tritonclient.http  # noqa: F401

    assert tritonclient.grpc.service_pb2.DESCRIPTOR.package == "inference"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_client_health_metadata_and_inference_equal_ort(server, protocol):
    if protocol == "http":
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module
    client = client_module.InferenceServerClient(server[protocol])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("typed", headers=auth()) and client.is_model_ready("mlp", headers=auth())
    meta = client.get_server_metadata(headers=auth())
    meta = meta if isinstance(meta, dict) else {"extensions": list(meta.extensions)}
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("typed", headers=auth())
    if not isinstance(model, dict):
        from google.protobuf.json_format import MessageToDict

        model = MessageToDict(model)
        for t in model["inputs"] + model["outputs"]:
            t["shape"] = [int(d) for d in t["shape"]]
    assert model["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 16]}
    assert [(t["name"], t["datatype"]) for t in model["outputs"]] == \
        [("y", "FP32"), ("next_ids", "INT64"), ("unmasked", "BOOL"), ("label_out", "BYTES")]
    feeds = _typed_feeds(3)
    expected = _ort(server["typed"], feeds)
    for binary in ([True, False] if protocol == "http" else [True]):
        outputs = [client_module.InferRequestedOutput(n, binary_data=binary) if protocol == "http"
                   else client_module.InferRequestedOutput(n) for n in expected]
        result = client.infer("typed", _triton_inputs(client_module, feeds, binary), outputs=outputs, headers=auth())
        for name, want in expected.items():
            got = result.as_numpy(name)
            if name == "label_out":
                got = np.array([v.decode() if isinstance(v, bytes) else v for v in got], dtype=object)
            assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want), name


def test_concurrent_clients_get_their_own_rows_and_requests_are_joined(server):
    import tritonclient.http as th

    before = _handle("mlp").totals.remote().result()

    def one(i: int):
        client = th.InferenceServerClient(server["http"])
        x = np.random.default_rng(i).random((1 + i % 3, 16), dtype=np.float32)
        got = client.infer("mlp", _triton_inputs(th, {"x": x}, True), headers=auth()).as_numpy("y")
        return np.allclose(got, _ort(server["mlp"], {"x": x})["y"], rtol=1e-5, atol=1e-6)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(96)))
    after = _handle("mlp").totals.remote().result()
    requests_, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests_ == 96 and batches < requests_, (requests_, batches)


def _infer_raw(server, body, headers=None, model="typed"):
    return requests.post(f"http://{server['http']}/v2/models/{model}/infer", data=body,
                         headers={**auth(), **(headers or {})}, timeout=60)


def _json_body(feeds: dict, **change) -> dict:
    inputs = [{"name": k, "shape": list(v.shape), "datatype": TYPES[k], "data": v.reshape(-1).tolist()}
              for k, v in feeds.items()]
    for entry in inputs:
        entry.update(change.get(entry["name"], {}))
    return {"inputs": inputs}


BAD = {
    "malformed JSON": (b'{"inputs": [', 400, "not valid JSON"),
    "missing input": (lambda b: {"inputs": b["inputs"][1:]}, 400, "missing input(s) ['x']"),
    "extra input": (lambda b: {"inputs": b["inputs"] + [{**b["inputs"][0], "name": "z"}]}, 400, "unknown input 'z'"),
    "wrong datatype": ({"x": {"datatype": "INT32"}}, 400, "input 'x' has datatype 'INT32'"),
    "element count": ({"x": {"shape": [2, 16]}}, 400, "input 'x': shape [2, 16] holds 32"),
    "non-numeric FP32": ({"x": {"data": ["a"] * 16}}, 400, "FP32 data must be numbers"),
    "negative shape": ({"x": {"shape": [-1, 16]}}, 400, "negative"),
    "absurd shape": ({"x": {"shape": [2**62, 16]}}, 400, "holds more than"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_a_4xx_naming_the_tensor_and_the_server_stays_healthy(server, case):
    change, status, message = BAD[case]
    body = _json_body(_typed_feeds(1))
    body = change if isinstance(change, bytes) else json.dumps(
        change(body) if callable(change) else _json_body(_typed_feeds(1), **change)).encode()
    response = _infer_raw(server, body)
    assert response.status_code == status and message in response.json()["error"], response.text
    good = _infer_raw(server, json.dumps(_json_body(_typed_feeds(2))).encode())
    assert good.status_code == 200 and [o["name"] for o in good.json()["outputs"]][0] == "y"


def test_binary_size_that_does_not_match_the_body_is_a_400(server):
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 64}}]}).encode()
    response = _infer_raw(server, head + b"\0" * 60, {"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 400 and "binary_data_size 64 runs past" in response.json()["error"]


def test_unknown_models_versions_and_routes_are_404_with_an_error_body(server):
    base = f"http://{server['http']}"
    for url in ("/v2/models/nope", "/v2/models/../../etc/passwd/infer", "/v2/models/typed/versions/2",
                "/v2/nothing"):
        response = requests.get(base + url, headers=auth(), timeout=30)
        assert response.status_code == 404 and response.json()["error"], url
    assert "unknown model 'nope'" in requests.get(base + "/v2/models/nope", headers=auth(), timeout=30).json()["error"]


def test_the_api_key_guards_every_route_but_the_health_checks(server):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    base = f"http://{server['http']}"
    assert requests.get(base + "/v2/health/live", timeout=30).status_code == 200
    assert requests.get(base + "/v2/health/ready", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-key-0000"}, {"Authorization": KEY}):
        for method, url in (("get", "/v2"), ("get", "/v2/models/typed"), ("get", "/v2/models/typed/ready"),
                            ("post", "/v2/models/typed/infer")):
            response = getattr(requests, method)(base + url, headers=headers, timeout=30)
            assert response.status_code == 401 and "API key" in response.json()["error"], (url, headers)
            assert "typed" not in response.text and KEY not in response.text
    client = tg.InferenceServerClient(server["grpc"])
    assert client.is_server_live()
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.get_model_metadata("typed")
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.infer("mlp", _triton_inputs(tg, {"x": np.zeros((1, 16), np.float32)}, True))


def test_a_body_over_the_limit_is_a_413(server):
    big = json.dumps(_json_body({"x": np.zeros((MAX_BODY // 16, 16), np.float32)})).encode()
    response = _infer_raw(server, big, model="mlp")
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    assert _infer_raw(server, json.dumps(_json_body({"x": np.ones((1, 16), np.float32)})).encode(),
                      model="mlp").status_code == 200


def test_a_full_queue_answers_503_at_once(server):
    """``small`` takes 2 waiting requests; its last stage is stopped, so requests pile up until refused."""
    body = json.dumps(_json_body({"x": np.ones((1, 16), np.float32)})).encode()
    pid = _handle("small").worker_pids.remote().result()[-1][0]
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(12) as pool:
            pending = [pool.submit(_infer_raw, server, body, None, "small") for _ in range(12)]
            refused = []
            deadline = time.monotonic() + 30
            while len(refused) == 0 and time.monotonic() < deadline:
                refused = [f.result() for f in pending if f.done()]
                time.sleep(0.05)
            assert refused and all(r.status_code == 503 and "overloaded" in r.json()["error"] for r in refused)
            os.kill(pid, signal.SIGCONT)
            answers = [f.result() for f in pending]
    finally:
        with contextlib.suppress(ProcessLookupError):  # replaced meanwhile (a hung worker past its deadline)
            os.kill(pid, signal.SIGCONT)
    assert {r.status_code for r in answers} <= {200, 503} and any(r.status_code == 200 for r in answers)
    assert _infer_raw(server, body, model="small").status_code == 200


def test_a_killed_stage_worker_loses_no_request(server):
    """A bounded load (loopback, 8 clients, 64 requests) while stage 1 of ``mlp`` is SIGKILLed: every request
    gets the right answer, and the pipeline counts the restart."""
    import tritonclient.http as th

    restarts = _handle("mlp").totals.remote().result()["restarts"]
    victim = _handle("mlp").worker_pids.remote().result()[1][0]

    def one(i: int):
        if i == 16:
            os.kill(victim, signal.SIGKILL)
        x = np.random.default_rng(100 + i).random((2, 16), dtype=np.float32)
        got = th.InferenceServerClient(server["http"], network_timeout=120).infer(
            "mlp", _triton_inputs(th, {"x": x}, True), headers=auth()).as_numpy("y")
        return np.allclose(got, _ort(server["mlp"], {"x": x})["y"], rtol=1e-5, atol=1e-6)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(64)))
    assert _handle("mlp").totals.remote().result()["restarts"] > restarts


def test_pipeline_metrics_by_model_reach_rays_prometheus_endpoint(server, ray_session):
    """After the requests above: queue time, batch size and per-stage compute, labelled by model, next to
    Serve's own request metrics (Ray exports every few seconds)."""
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    wanted = ['ray_onnxshard_queue_seconds_bucket{', 'ray_onnxshard_batch_size_bucket{',
              'ray_onnxshard_stage_compute_seconds_bucket{', 'ray_serve_num_http_requests']
    deadline, text = time.monotonic() + 60, ""

    def mlp_stage_1(text):
        return [line for line in text.splitlines() if line.startswith("ray_onnxshard_stage_compute_seconds_count")
                and 'model="mlp"' in line and 'stage="1"' in line]

    while time.monotonic() < deadline:  # each process exports on its own clock
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted) and mlp_stage_1(text):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    names = sorted({line.split("{")[0] for line in text.splitlines() if not line.startswith("#")})
    assert not missing, (missing, len(text), [n for n in names if "onnxshard" in n or "serve" in n][:20])
    assert mlp_stage_1(text)


fuzz = {"ok": 0, "refused": 0}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(change=st.dictionaries(st.sampled_from(["x", "mask", "ids", "label"]),
                              st.fixed_dictionaries({}, optional={
                                  "shape": st.lists(st.integers(-3, 20), max_size=3),
                                  "datatype": st.sampled_from(["FP32", "BOOL", "INT64", "BYTES", "FP16", "nope"]),
                                  "data": st.lists(st.one_of(st.integers(-9, 9), st.floats(allow_nan=False),
                                                             st.booleans(), st.text(max_size=3)), max_size=20)}),
                              max_size=2))
def test_fuzzed_infer_bodies_get_2xx_or_4xx_with_an_error(server, change):
    response = _infer_raw(server, json.dumps(_json_body(_typed_feeds(1), **change)).encode())
    if response.status_code == 200:
        fuzz["ok"] += 1
    else:
        assert 400 <= response.status_code < 500 and isinstance(response.json()["error"], str), response.text
        fuzz["refused"] += 1


def test_the_http_fuzz_took_both_branches():
    assert fuzz["ok"] > 0 and fuzz["refused"] > 0, fuzz

"""Serving one plan: the ingress replicas own its pipeline themselves (no model deployment, a Serve hop less),
reserving the stage workers' bundles in their own placement group."""

import socket
import time

import numpy as np
import onnxruntime as ort
import pytest
import zoo

import onnxshard


@pytest.fixture(scope="module")
def solo(ray_session, tmp_path_factory):
    from ray import serve
    from ray.serve.config import gRPCOptions

    from onnxshard.serve import GRPC_SERVICER, build_app

    root = tmp_path_factory.mktemp("solo")
    model = zoo.save(zoo.mlp(layers=4), root / "src")
    onnxshard.plan(model, root / "solo", stages=2)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    serve.start(http_options={"host": "127.0.0.1", "port": ports[0]},
                grpc_options=gRPCOptions(port=ports[1], grpc_servicer_functions=[GRPC_SERVICER]))
    serve.run(build_app({"plan_dir": str(root / "solo")}), name="onnxshard", route_prefix="/")
    yield {"http": f"127.0.0.1:{ports[0]}", "grpc": f"127.0.0.1:{ports[1]}", "model": str(model)}
    serve.shutdown()


def test_one_plan_is_served_by_the_ingress_alone_and_equals_ort(solo):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from ray import serve

    assert set(serve.status().applications["onnxshard"].deployments) == {"kserve-ingress"}
    x = np.random.default_rng(3).random((5, 16), dtype=np.float32)
    want = ort.InferenceSession(solo["model"]).run(None, {"x": x})[0]
    for module, url in ((th, solo["http"]), (tg, solo["grpc"])):
        client = module.InferenceServerClient(url)
        assert client.is_model_ready("solo")
        tensor = module.InferInput("x", [5, 16], "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("solo", [tensor]).as_numpy("y")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_deploy_the_cluster_has_no_room_for_fails_within_its_timeout_naming_what_waits(solo, tmp_path):
    """Serve waits forever for CPUs that never come: ``onnxshard serve`` gives up after ``--deploy-timeout``,
    deletes what it deployed, and says which deployment waits and why; the app already served is untouched."""
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    from onnxshard.errors import ClusterError
    from onnxshard.serve.server import deploy, parse_args

    free = ray.available_resources().get("CPU", 0)
    hold = placement_group([{"CPU": free}])  # every free CPU taken
    ray.get(hold.ready(), timeout=60)
    try:
        onnxshard.plan(solo["model"], tmp_path / "p", stages=2)
        from onnxshard.serve import build_app

        app = build_app(parse_args({"plan_dir": str(tmp_path / "p")}))
        started = time.monotonic()
        with pytest.raises(ClusterError, match=r"not running after deploy_timeout_s=3 .*waiting: kserve-ingress "
                                               r"\((DEPLOYING|UPDATING)"):
            deploy(app, 3, name="no-room", route_prefix="/no-room")
        assert time.monotonic() - started < 3 + 30
    finally:
        remove_placement_group(hold)
    assert "no-room" not in serve.status().applications
    assert serve.status().applications["onnxshard"].status == "RUNNING"

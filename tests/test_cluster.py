"""cluster/: manifests parse and name real CLI flags; the job-submission recipe works (slow: starts a Ray head)."""

import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
import zoo

import onnxshard
from onnxshard.cli import build_parser

CLUSTER = Path(__file__).parent.parent / "cluster"


def test_kuberay_manifests_parse_and_the_job_entrypoint_is_a_valid_command():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "onnxshard"
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    assert args.command == "run" and args.replicas == 2
    batch = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-batch.yaml").read_text())
    assert batch["kind"] == "RayJob" and batch["spec"]["clusterSelector"] == job["spec"]["clusterSelector"]
    argv = shlex.split(batch["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert argv[0] == "onnxshard" and args.command == "batch" and args.replicas == 2 and args.keep == "id"


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_on_a_local_cluster(tmp_path):
    path = zoo.save(zoo.transformer(layers=2), tmp_path / "m")
    onnxshard.plan(path, tmp_path / "plan", stages=2)
    feeds = {"x": np.random.default_rng(0).standard_normal((6, 4, 32)).astype(np.float32),
             "mask": np.ones((6, 4), np.float32)}
    np.savez(tmp_path / "in.npz", **feeds)
    run = subprocess.run([str(CLUSTER / "scripts" / "submit_local.sh"), str(tmp_path / "plan"),
                          str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), "--micro-batch-size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    from onnxshard.runtime import tools

    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["y"], tools.run_model(path, feeds)["y"])


def test_the_serve_config_and_rayservice_manifest_build_the_app(tmp_path, monkeypatch):
    """cluster/serve_config.yaml and kuberay/rayservice.yaml name the builder and gRPC servicer that exist, with
    arguments ServeArgs takes (the repository pointed at a real one here)."""
    import importlib

    from onnxshard.serve import ServeArgs, build_app

    config = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    for serve_config in (config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        module, _, name = serve_config["grpc_options"]["grpc_servicer_functions"][0].rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
        (app,) = serve_config["applications"]
        module, _, name = app["import_path"].partition(":")
        assert getattr(importlib.import_module(module), name) is build_app
        zoo.save(zoo.mlp(), tmp_path / "repo" / "mlp")
        monkeypatch.setenv(app["args"]["api_key_env"], "a-key-for-the-test")
        args = ServeArgs.model_validate({**app["args"], "repository": str(tmp_path / "repo")})
        assert build_app(args) is not None

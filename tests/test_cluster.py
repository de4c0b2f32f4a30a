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

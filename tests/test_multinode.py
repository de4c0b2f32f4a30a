"""Pipelines over several Ray nodes, on this one machine: ``ray.cluster_utils.Cluster`` starts a head (the driver's,
no CPUs for workers) and worker nodes, as Ray's own tests do. Its own Ray, so ``make test`` runs this module in a
pytest of its own (``-m multinode``); a whole-suite run stops the shared local Ray first and starts it again after.
"""

import os
import signal

import numpy as np
import pytest
import zoo
from conftest import start_local_ray

import onnxshard
from onnxshard.distributed import Pipeline
from onnxshard.runtime import tools

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    shared = ray.is_initialized()
    if shared:
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        # "pair" holds two stages at once (a Unix hop between them); the "single" nodes one each: three for a
        # pipeline and one to spare for each node the tests take away
        workers = {"pair": nodes.add_node(num_cpus=2, resources={"pair": 2})}
        for i in range(5):
            workers[f"single{i}"] = nodes.add_node(num_cpus=1, resources={"single": 1})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False, logging_level="ERROR")
        yield nodes, workers
    finally:
        ray.shutdown()
        nodes.shutdown()
        if shared:
            start_local_ray()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    path = zoo.save(zoo.transformer(layers=6), tmp / "model")
    batches = [tools.random_feeds(onnxshard.plan(path, tmp / "probe").inputs, dims={"batch": 2, "seq": 8}, seed=i)
               for i in range(24)]
    return path, onnxshard.plan(path, tmp / "p3", stages=3), batches, [tools.run_model(path, f) for f in batches]


def _node_of(cluster, worker_info) -> list[str]:
    nodes, workers = cluster
    ids = {node.node_id: name for name, node in workers.items()}
    return [ids.get(ranks[0]["node"], "head") for ranks in worker_info[0]]


def _exact(references, results):
    assert len(results) == len(references)
    for ref, got in zip(references, results):
        assert tools.max_differences(ref, got) == {"y": 0.0}


def test_a_pipeline_over_three_nodes_links_them_over_tcp_and_equals_ort(cluster, model):
    _, plan, batches, references = model
    with Pipeline(plan, cpus_per_stage=1, resources={"single": 1}, placement_strategy="STRICT_SPREAD",
                  micro_batch_size=1) as pipe:
        where = _node_of(cluster, pipe.worker_info)
        assert len(set(where)) == 3 and "head" not in where
        assert pipe.transport == "direct" and pipe.hops == [["tcp"] * 4]  # in, two between stages, back
        # what the workers' own sockets are, not what the coordinator meant them to be
        import ray

        kinds = ray.get([ranks[0].link_kinds.remote() for ranks in pipe.workers[0]])
        assert kinds == [{"up": "tcp", "down": "tcp"}] * 3
        _exact(references, list(pipe.stream(batches)))
        assert {c.stage for c in pipe.stats.calls} == {0, 1, 2} and not pipe.recoveries


def test_hops_within_a_node_stay_unix_sockets(cluster, model):
    _, plan, batches, references = model
    two = onnxshard.plan(model[0], plan.root.parent / "p2", stages=2)
    with Pipeline(two, cpus_per_stage=1, resources={"pair": 1}, placement_strategy="STRICT_PACK") as pipe:
        assert _node_of(cluster, pipe.worker_info) == ["pair", "pair"]
        assert pipe.hops == [["tcp", "unix", "tcp"]]
        import ray

        assert ray.get([ranks[0].link_kinds.remote() for ranks in pipe.workers[0]]) == [
            {"up": "tcp", "down": "unix"}, {"up": "unix", "down": "tcp"}]
        _exact(references[:6], list(pipe.stream(batches[:6])))


@pytest.mark.parametrize("strategy,resource,turns", [("STRICT_SPREAD", "single", False), ("STRICT_PACK", "pair", True)])
def test_a_generators_stages_take_turns_only_when_they_share_a_nodes_cpus(cluster, tmp_path, strategy, resource, turns):
    """Two stages on two nodes work at once, a thread each; on one node they take turns, each on both CPUs."""
    from test_generation import _prompts, ort_greedy

    from onnxshard import decoder_models as dm
    from onnxshard.distributed.generator import Generator
    from onnxshard.sampling import SamplingParams

    path = onnxshard.models.save(dm.llama_cached(layers=2), tmp_path / "decoder", external=True)
    plan = onnxshard.plan(path, tmp_path / "plan", stages=2)
    prompts = _prompts(4)
    with Generator(plan, cpus_per_stage=1, resources={resource: 1}, placement_strategy=strategy) as gen:
        assert len(set(_node_of(cluster, gen.placement.info))) == (1 if turns else 2)
        assert gen.turns is turns
        assert [ranks[0]["threads"] for ranks in gen.placement.info[0]] == [2 if turns else 1] * 2
        got = gen.generate(prompts, SamplingParams(max_tokens=6))
    assert got == [ort_greedy(path, p, 6) for p in prompts]


def test_tensor_parallel_ranks_on_two_nodes_reduce_over_tcp(cluster, model):
    import ray

    path, plan, batches, references = model
    tp = onnxshard.plan(path, plan.root.parent / "tp2", tensor_parallel=2)
    with Pipeline(tp, cpus_per_stage=1, resources={"single": 1}, placement_strategy="STRICT_SPREAD",
                  micro_batch_size=1) as pipe:
        assert len(set(_nodes_of_ranks(cluster, pipe.worker_info))) == 2
        assert pipe.transport == "direct"
        assert ray.get([w.mesh_kinds.remote() for w in pipe.workers[0][0]]) == [{1: "tcp"}, {0: "tcp"}]
        for ref, got in zip(references[:6], pipe.stream(batches[:6])):
            assert tools.max_differences(ref, got)["y"] <= 1e-4


def _nodes_of_ranks(cluster, worker_info) -> list[str]:
    _, workers = cluster
    ids = {node.node_id: name for name, node in workers.items()}
    return [ids.get(w["node"], "head") for ranks in worker_info[0] for w in ranks]


def test_a_plan_given_by_uri_runs_over_three_nodes(cluster, model):
    """Each worker copies its own stage from the URI into its node's cache (here the nodes share one machine's
    temp folder, so they share the cache too; each still copies only its stage's files)."""
    _, plan, batches, references = model
    uri = "file://" + str(plan.root)
    with Pipeline(uri, cpus_per_stage=1, resources={"single": 1}, placement_strategy="STRICT_SPREAD") as pipe:
        assert pipe.plan.uri == uri and len(set(_node_of(cluster, pipe.worker_info))) == 3
        _exact(references[:8], list(pipe.stream(batches[:8])))


def test_the_run_command_spreads_stages_over_nodes(cluster, model, tmp_path, capsys):
    """What ``ray job submit -- onnxshard run ...`` does on a cluster: the strategy and a node resource from flags."""
    from onnxshard.cli import main

    path, plan, batches, references = model
    np.savez(tmp_path / "in.npz", **batches[0])
    assert main(["run", str(plan.root), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"),
                 "--placement-strategy", "STRICT_SPREAD", "--resource", "single=1"]) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert tools.max_differences(references[0], dict(out)) == {"y": 0.0}
    assert main(["run", str(plan.root), "--inputs", "x.npz", "--outputs", "y.npz", "--placement-strategy", "WIDE"]) == 2
    assert "WIDE" in capsys.readouterr().err
    assert main(["run", str(plan.root), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "o2.npz"),
                 "--resource", "single=lots"]) == 2
    assert "--resource single=lots" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["removed", "crashed"])
def test_a_node_lost_mid_run_loses_no_result(cluster, model, how):
    """``removed``: its raylet stops and says so (a drained node, a deleted pod), and Ray moves the stage's bundle;
    ``crashed``: its raylet and the stage worker on it are SIGKILLed (a machine gone at once), which Ray's health
    check notices only many seconds later: the refused connection to the raylet says so at once."""
    nodes, workers = cluster
    _, plan, batches, references = model
    with Pipeline(plan, cpus_per_stage=1, resources={"single": 1}, placement_strategy="SPREAD",
                  micro_batch_size=1) as pipe:
        victim = _node_of(cluster, pipe.worker_info)[1]
        results = []
        for i, got in enumerate(pipe.stream(batches)):
            results.append(got)
            if i == 4:
                if how == "crashed":
                    os.kill(pipe.worker_info[0][1][0]["pid"], signal.SIGKILL)
                nodes.remove_node(workers.pop(victim), allow_graceful=how == "removed")
        _exact(references, results)
        assert [r.stage for r in pipe.recoveries] == [1] and "direct link broken" in pipe.recoveries[0].cause
        where = _node_of(cluster, pipe.worker_info)
        assert where[1] != victim and len(set(where)) == 3
        assert pipe.stats.delivered == pipe.stats.micro_batches and pipe.hops == [["tcp"] * 4]
        # a crashed node's stage is not left waiting for Ray's health check: it gets a placement group of its own
        assert list(pipe.placement.moved) == ([(0, 1)] if how == "crashed" else [])


def test_a_crashed_node_with_no_room_left_fails_the_run_in_time_naming_the_node_and_resources(cluster, model):
    """After the two losses above, three "single" nodes are left for three stages: nowhere to go."""
    from onnxshard.errors import WorkerError

    nodes, workers = cluster
    _, plan, batches, _ = model
    with Pipeline(plan, cpus_per_stage=1, resources={"single": 1}, placement_strategy="STRICT_SPREAD",
                  micro_batch_size=1, worker_start_timeout_s=5) as pipe:
        victim = _node_of(cluster, pipe.worker_info)[1]
        node_id = workers[victim].node_id
        pipe.run(batches[0])
        os.kill(pipe.worker_info[0][1][0]["pid"], signal.SIGKILL)
        nodes.remove_node(workers.pop(victim), allow_graceful=False)
        with pytest.raises(WorkerError, match=rf"node {node_id} is gone.*'single': 1"):
            pipe.run(batches[1])

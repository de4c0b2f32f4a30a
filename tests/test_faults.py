"""Fault injection on real Ray processes: killed and hung workers, exactly-once results, clean failure."""

import os
import signal
import time

import numpy as np
import psutil
import pytest
import ray
import zoo

import onnxshard
from onnxshard import WorkerError
from onnxshard.distributed import Pipeline
from onnxshard.distributed.transports import PROBE_S

pytestmark = pytest.mark.usefixtures("ray_session")

MICRO_BATCHES = 120


def _kill(pipe, replica, stage, how):
    if how == "ray.kill":
        ray.kill(pipe.workers[replica][stage][0], no_restart=True)
    else:
        os.kill(pipe.worker_info[replica][stage][0]["pid"], signal.SIGKILL)


def _run_with_fault(pipe, feeds, fault, at=40):
    fired = []

    def progress(done, submitted):
        if done >= at and not fired:
            fired.append(done)
            fault()

    out = pipe.run(feeds, progress=progress)
    assert fired, "the fault was never injected"
    return out


@pytest.fixture(scope="module")
def mlp_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    path = zoo.save(zoo.mlp(layers=6, width=32), tmp / "model")
    return onnxshard.plan(path, tmp / "plan", stages=3)


def _feeds():
    return {"x": np.random.default_rng(7).standard_normal((MICRO_BATCHES, 32)).astype(np.float32)}


EVERY_KILL = [(stage, how) for stage in range(3) for how in ("ray.kill", "os.kill")]
ONE_PER_STAGE = [(0, "ray.kill"), (1, "os.kill"), (2, "ray.kill")]


@pytest.mark.parametrize("replicas, transport, kills", [(1, "direct", EVERY_KILL), (2, "direct", ONE_PER_STAGE),
                                                        (1, "ray", ONE_PER_STAGE)])
def test_killed_workers_are_replaced_and_results_are_exact(mlp_plan, replicas, transport, kills):
    feeds = _feeds()
    with Pipeline(mlp_plan, micro_batch_size=1, replicas=replicas, cpus_per_stage=0.5, max_restarts=4,
                  transport=transport) as pipe:
        expected = pipe.run(feeds)["y"]
        before = {w["pid"] for row in pipe.worker_info for ranks in row for w in ranks}
        for stage, how in kills:
            replica = stage % replicas
            got = _run_with_fault(pipe, feeds, lambda s=stage, h=how, r=replica: _kill(pipe, r, s, h))["y"]
            assert np.array_equal(got, expected), (stage, how)  # bit for bit
            assert pipe.stats.micro_batches == MICRO_BATCHES
            assert pipe.stats.delivered == MICRO_BATCHES  # none lost, none repeated
            assert pipe.recoveries[-1].stage == stage and pipe.recoveries[-1].replica == replica
        assert len(pipe.recoveries) == len(kills)
        print("recovery seconds:", sorted(round(r.seconds, 3) for r in pipe.recoveries))
        all_pids = before | {w["pid"] for row in pipe.worker_info for ranks in row for w in ranks}
    _assert_gone(all_pids)


def test_micro_batches_out_of_retries_fail_their_batch_and_the_pipeline_goes_on(mlp_plan):
    """With max_retries=0 every micro-batch a killed worker took is out of retries: its batch fails at once,
    none of them stays in the window waiting for a result that will never come, and the next run is exact."""
    feeds = _feeds()
    with Pipeline(mlp_plan, micro_batch_size=1, cpus_per_stage=0.5, max_retries=0, max_restarts=4,
                  run_timeout_s=120) as pipe:
        expected = pipe.run(feeds)["y"]
        with pytest.raises(WorkerError, match="over max_retries=0"):
            _run_with_fault(pipe, feeds, lambda: _kill(pipe, 0, 1, "os.kill"))
        assert pipe.recoveries and pipe.recoveries[-1].stage == 1
        assert np.array_equal(pipe.run(feeds)["y"], expected)


@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_hung_worker_is_killed_after_the_call_deadline_and_replaced(mlp_plan, transport):
    feeds = _feeds()
    with Pipeline(mlp_plan, micro_batch_size=1, cpus_per_stage=0.5, call_timeout_s=2, transport=transport) as pipe:
        expected = pipe.run(feeds)["y"]
        stopped = pipe.worker_info[0][1][0]["pid"]
        t0 = time.perf_counter()
        got = _run_with_fault(pipe, feeds, lambda: os.kill(stopped, signal.SIGSTOP))["y"]
        assert np.array_equal(got, expected)
        assert pipe.recoveries[-1].stage == 1 and "call deadline" in pipe.recoveries[-1].cause
        assert time.perf_counter() - t0 < 2 + 20
    _assert_gone({stopped})


def test_hung_worker_without_restarts_fails_within_the_deadline(mlp_plan):
    with Pipeline(mlp_plan, micro_batch_size=1, cpus_per_stage=0.5, call_timeout_s=2, max_restarts=0) as pipe:
        pid = pipe.worker_info[0][2][0]["pid"]
        t0 = time.perf_counter()
        with pytest.raises(WorkerError, match=r"stage 2 worker \(replica 0\) was lost 1 times.*call deadline"):
            _run_with_fault(pipe, _feeds(), lambda: os.kill(pid, signal.SIGSTOP), at=10)
        assert time.perf_counter() - t0 < 2 + PROBE_S + 4  # the deadline, the probe, slack
        pids = {ranks[0]["pid"] for ranks in pipe.worker_info[0]}
    _assert_gone(pids)


def test_repeated_kills_beyond_the_restart_limit_fail_cleanly(mlp_plan):
    feeds = _feeds()
    with Pipeline(mlp_plan, micro_batch_size=1, cpus_per_stage=0.5, max_restarts=1) as pipe:
        pids = {pipe.worker_info[0][0][0]["pid"]}
        _run_with_fault(pipe, feeds, lambda: _kill(pipe, 0, 0, "os.kill"))
        pids.add(pipe.worker_info[0][0][0]["pid"])
        with pytest.raises(WorkerError, match=r"was lost 2 times, over max_restarts=1"):
            _run_with_fault(pipe, feeds, lambda: _kill(pipe, 0, 0, "os.kill"))
        pids |= {ranks[0]["pid"] for ranks in pipe.worker_info[0]}
    _assert_gone(pids)


def test_data_errors_are_skipped_or_raised_not_retried(tmp_path):
    path = zoo.save(zoo.failing_gather(), tmp_path / "m")
    plan = onnxshard.plan(path, tmp_path / "p", cuts=["t"])
    good = {"x": np.ones((4, 4), np.float32), "idx": np.array([0, 1, 2, 3], np.int64)}
    bad = {"x": np.ones((4, 4), np.float32), "idx": np.array([0, 1, 2, 99], np.int64)}
    with Pipeline(plan, micro_batch_size=2, cpus_per_stage=0.5) as pipe:
        results = list(pipe.stream([good, bad, good, bad, good], on_error="skip"))
        assert len(results) == 3
        assert [s.request for s in pipe.skipped] == [1, 3] and all(s.stage == 1 for s in pipe.skipped)
        assert not pipe.recoveries  # a data error is not a dead worker
        with pytest.raises(WorkerError, match="stage 1, micro-batch"):
            list(pipe.stream([good, bad], on_error="raise"))
        # coalesced in pairs, a bad request takes its partner with it: both are listed as skipped
        pipe.skipped.clear()
        results = list(pipe.stream([good, good, good, bad, good, good], on_error="skip", coalesce=8))
        assert len(results) == 4 and [s.request for s in pipe.skipped] == [2, 3]


def test_run_deadline(mlp_plan):
    with Pipeline(mlp_plan, micro_batch_size=1, cpus_per_stage=0.5, run_timeout_s=1.5, max_restarts=0) as pipe:
        pid = pipe.worker_info[0][0][0]["pid"]
        with pytest.raises(WorkerError, match="run deadline of 1.5 s"):
            _run_with_fault(pipe, _feeds(), lambda: os.kill(pid, signal.SIGSTOP), at=5)
        os.kill(pid, signal.SIGCONT)


def test_micro_batches_of_a_failed_batch_are_not_sent_again(mlp_plan):
    """A batch whose run deadline passed leaves its micro-batches in the window (their results are dropped when
    they come); when the hung worker holding them is replaced, none of them is sent again, and the next run is
    exact."""
    feeds = _feeds()
    with Pipeline(mlp_plan, micro_batch_size=1, cpus_per_stage=0.5, run_timeout_s=3, call_timeout_s=5,
                  max_restarts=1) as pipe:
        expected = pipe.run(feeds)["y"]
        pid = pipe.worker_info[0][1][0]["pid"]
        with pytest.raises(WorkerError, match="run deadline of 3 s"):
            _run_with_fault(pipe, feeds, lambda: os.kill(pid, signal.SIGSTOP), at=5)
        end = time.monotonic() + 40
        while not pipe.recoveries:
            assert time.monotonic() < end, "the hung worker was not replaced"
            time.sleep(0.2)
        assert "call deadline" in pipe.recoveries[-1].cause and pipe.recoveries[-1].replayed == 0
        assert np.array_equal(pipe.run(feeds)["y"], expected)
    _assert_gone({pid})


def _assert_gone(pids, wait=15.0):
    """Every worker process, replaced ones included, has exited after close()."""
    end = time.monotonic() + wait
    alive = set(pids)
    while alive and time.monotonic() < end:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.2)
    assert not alive, f"worker processes still alive after close(): {alive}"


def test_a_worker_that_cannot_load_its_shard_fails_the_start_and_frees_its_placement_group(tmp_path):
    """Stage 1's shard holds an op ONNX Runtime does not know (planning allows its domain): the pipeline fails to
    start with the loader's message, and its placement group and the other worker are gone (else every later
    pipeline on this Ray would wait for their CPUs)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from onnxshard.distributed.groups import live_groups

    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("Mystery", ["a"], ["b"], domain="com.example"),
             h.make_node("Neg", ["b"], ["y"])]
    value = [h.make_tensor_value_info(n, T.FLOAT, ["n", 4]) for n in ("x", "b", "y")]
    graph = h.make_graph(nodes, "mystery", [value[0]], [value[2]], value_info=[value[1]])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    path = zoo.save(model, tmp_path / "model")
    plan = onnxshard.plan(path, tmp_path / "plan", cuts=["a"], allow_domains=["com.example"])
    before = set(live_groups())
    with pytest.raises(WorkerError, match=r"failed to start.*Mystery"):
        Pipeline(plan, worker_start_timeout_s=60)
    left = set(live_groups()) - before
    assert not left, f"placement groups left behind: {left}"

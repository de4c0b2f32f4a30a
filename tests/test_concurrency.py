"""One long-lived pipeline, many callers: threads and asyncio tasks at once, dynamic batching, a bounded queue,
default deadlines, the restart window and resource failures. Every result is compared with plain ONNX Runtime on
that caller's own input."""

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import actors
import numpy as np
import onnx
import pytest
import zoo
from onnx import TensorProto as T
from onnx import helper as h

import onnxshard
from onnxshard import OverloadedError, WorkerError
from onnxshard.distributed import Pipeline
from onnxshard.runtime import tools

pytestmark = pytest.mark.usefixtures("ray_session")
ATOL = 1e-5  # ORT's GEMM may block rows differently for another row count: a few ulps, never more


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrency")
    path = zoo.save(zoo.mlp(layers=4, width=16), tmp / "model")
    return path, onnxshard.plan(path, tmp / "plan", stages=2)


def _feeds(seed: int, rows: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)}


def _check(model, feeds, got):
    want = tools.run_model(model, feeds)["y"]
    assert got["y"].shape == want.shape
    np.testing.assert_allclose(got["y"], want, rtol=0, atol=ATOL)


def test_threads_and_tasks_calling_run_stream_and_run_async_at_once(mlp):
    model, plan = mlp
    with Pipeline(plan, cpus_per_stage=0.5, max_batch_size=32, max_queue_delay_ms=2) as pipe:
        checked = []

        def runs(worker: int):
            for i in range(6):
                feeds = _feeds(100 * worker + i, 1 + (worker + i) % 5)
                _check(model, feeds, pipe.run(feeds))
                checked.append(1)

        def stream(worker: int):
            batches = [_feeds(1000 + 10 * worker + i, 3 + i) for i in range(5)]
            for feeds, got in zip(batches, pipe.stream(iter(batches)), strict=True):
                _check(model, feeds, got)
                checked.append(1)

        async def tasks():
            inputs = [_feeds(5000 + i, 1 + i % 3) for i in range(12)]
            results = await asyncio.gather(*(pipe.run_async(f) for f in inputs))
            for feeds, got in zip(inputs, results):
                _check(model, feeds, got)
                checked.append(1)

        with ThreadPoolExecutor(max_workers=11) as pool:
            futures = [pool.submit(runs, w) for w in range(8)] + [pool.submit(stream, w) for w in range(2)]
            futures.append(pool.submit(lambda: asyncio.run(tasks())))
            for f in futures:
                f.result(timeout=240)
        assert len(checked) == 8 * 6 + 2 * 5 + 12


@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_a_run_inside_a_stream_does_not_hang_the_stream(mlp, transport):
    model, plan = mlp
    batches = [_feeds(i, 4) for i in range(5)]
    with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=1, transport=transport) as pipe:
        for i, (feeds, got) in enumerate(zip(batches, pipe.stream(iter(batches)), strict=True)):
            _check(model, feeds, got)
            inner = _feeds(50 + i, 3)
            _check(model, inner, pipe.run(inner))


def _burst(pipe, count: int, rows: int = 1):
    """``count`` threads each send one request at the same moment; returns (feeds, result) pairs."""
    barrier = threading.Barrier(count)

    def one(i):
        feeds = _feeds(700 + i, rows)
        barrier.wait()
        return feeds, pipe.run(feeds)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_dynamic_batching_joins_concurrent_requests_and_returns_each_its_rows(mlp):
    model, plan = mlp
    counts = {}
    for max_batch_size in (None, 64):
        with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=64, max_batch_size=max_batch_size,
                      max_queue_delay_ms=200) as pipe:
            pipe.run(_feeds(0, 1))  # workers warm, the window empty
            before = pipe.totals
            for feeds, got in _burst(pipe, 16):
                _check(model, feeds, got)
            after = pipe.totals
            counts[max_batch_size] = {k: after[k] - before[k] for k in ("requests", "batches", "micro_batches")}
    assert counts[None] == {"requests": 16, "batches": 16, "micro_batches": 16}  # joining off: one each
    joined = counts[64]
    assert joined["requests"] == 16 and joined["batches"] < 16 and joined["micro_batches"] < 16, joined


def test_requests_whose_non_batch_dims_differ_are_not_joined(tmp_path):
    path = zoo.save(zoo.transformer(layers=1), tmp_path / "m")  # x [batch, seq, 32], mask [batch, seq]
    plan = onnxshard.plan(path, tmp_path / "p", stages=2)
    rng = np.random.default_rng(3)
    inputs = [{"x": rng.standard_normal((1, seq, 32)).astype(np.float32), "mask": np.ones((1, seq), np.float32)}
              for seq in (4, 4, 6, 6, 4)]
    with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=64, max_batch_size=64,
                  max_queue_delay_ms=100) as pipe:
        futures = [pipe.submit(f) for f in inputs]
        for feeds, fut in zip(inputs, futures):
            np.testing.assert_allclose(fut.result(timeout=60)["y"], tools.run_model(path, feeds)["y"], atol=ATOL)
        assert pipe.totals["batches"] >= 2  # seq 4 and seq 6 never share a batch


def test_a_full_queue_refuses_at_once(mlp):
    model, plan = mlp
    with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=1, max_queue_size=2) as pipe:
        big = _feeds(1, 200)  # 200 micro-batches keep the window full and the backlog long
        first = pipe.submit(big)
        end = time.monotonic() + 30
        while pipe.totals["queued"] and time.monotonic() < end:  # taken: its micro-batches wait in the backlog
            time.sleep(0.001)
        waiting = [pipe.submit(_feeds(2 + i, 1)) for i in range(2)]
        started = time.monotonic()
        with pytest.raises(OverloadedError, match="overloaded: 2 requests"):
            pipe.submit(_feeds(9, 1))
        assert time.monotonic() - started < 1  # refused at once, not queued
        _check(model, big, first.result(timeout=120))
        for i, fut in enumerate(waiting):
            _check(model, _feeds(2 + i, 1), fut.result(timeout=60))
        _check(model, _feeds(9, 1), pipe.run(_feeds(9, 1)))  # room again


def test_the_default_deadline_finds_a_stopped_worker_without_any_option(mlp):
    model, plan = mlp
    with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=2) as pipe:  # no call_timeout_s, no run_timeout_s
        feeds = _feeds(11, 8)
        _check(model, feeds, pipe.run(feeds))
        pid = pipe.worker_info[0][1][0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            _check(model, feeds, pipe.run(feeds))
            waited = time.monotonic() - started
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert [r.stage for r in pipe.recoveries] == [1] and "call deadline" in pipe.recoveries[0].cause
        assert waited >= 30  # the floor of the measured deadline: found by it, not by luck


def test_restarts_spread_over_time_pass_the_budget_and_a_crash_loop_fails_fast(mlp):
    model, plan = mlp
    feeds = _feeds(5, 4)
    with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=1, max_restarts=1, restart_window_s=2,
                  transport="ray") as pipe:
        for _ in range(2):  # one loss per window: always within the budget
            actors.kill(pipe.workers[0][0][0])
            _check(model, feeds, pipe.run(feeds))
            time.sleep(2.2)
        assert len(pipe.recoveries) == 2
    # the same two losses inside one window (a long one: a replacement's start takes seconds on a busy machine)
    with Pipeline(plan, cpus_per_stage=0.5, micro_batch_size=1, max_restarts=1, restart_window_s=120,
                  transport="ray") as pipe:
        actors.kill(pipe.workers[0][0][0])
        _check(model, feeds, pipe.run(feeds))
        actors.kill(pipe.workers[0][0][0])  # a second loss inside the window: over the budget
        with pytest.raises(WorkerError, match=r"lost 2 times, over max_restarts=1 within restart_window_s=120"):
            pipe.run(feeds)


def _expand_model(folder):
    graph = h.make_graph([h.make_node("Expand", ["x", "shape"], ["e"]), h.make_node("Relu", ["e"], ["y"])], "e",
                         [h.make_tensor_value_info("x", T.FLOAT, ["batch", 1]),
                          h.make_tensor_value_info("shape", T.INT64, [2])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", None])])
    return zoo.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), folder)


def test_out_of_memory_is_a_resource_failure_never_skipped_as_data(tmp_path):
    path = _expand_model(tmp_path / "m")
    plan = onnxshard.plan(path, tmp_path / "p", stages=2)
    good = {"x": np.ones((2, 1), np.float32), "shape": np.array([1, 3], np.int64)}  # (2, 1) -> (2, 3)
    huge = {"x": np.ones((2, 1), np.float32), "shape": np.array([1, 1 << 40], np.int64)}  # TiBs: ORT cannot
    assert onnx.load(str(path)).graph.node[0].op_type == "Expand"
    with Pipeline(plan, cpus_per_stage=0.5, max_retries=1, max_restarts=5) as pipe:
        with pytest.raises(WorkerError, match="out of memory"):
            list(pipe.stream([huge], on_error="skip"))  # not skipped as bad data: it fails
        assert list(pipe.skipped) == []
        assert pipe.recoveries and all("out of memory" in r.cause for r in pipe.recoveries)  # replaced, replayed
        np.testing.assert_array_equal(pipe.run(good)["y"], tools.run_model(path, good)["y"])

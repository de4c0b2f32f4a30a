"""Micro-batch split and merge, without Ray."""

import numpy as np
import pytest

from onnxshard.distributed import microbatch
from onnxshard.distributed.microbatch import BatchAxes
from onnxshard.errors import InputError

AXES = BatchAxes({"x": 0, "state": 1, "table": None}, {"y": 0, "state_out": 1})


def _feeds(n):
    return {"x": np.arange(n * 3).reshape(n, 3), "state": np.arange(2 * n).reshape(2, n), "table": np.ones(4)}


@pytest.mark.parametrize("n,size,count", [(7, 3, 3), (6, 3, 2), (2, 5, 1), (5, 1, 5), (4, None, 1)])
def test_split_makes_views_of_the_right_sizes_and_assembly_inverts_it(n, size, count):
    feeds = _feeds(n)
    parts = microbatch.split(feeds, AXES, size)
    assert len(parts) == count
    assert all(p["table"] is feeds["table"] for p in parts)  # broadcast, not split
    assert all(np.shares_memory(p["x"], feeds["x"]) for p in parts)
    outputs = [{"y": p["x"] * 2, "state_out": p["state"] + 1} for p in parts]
    assembly = microbatch.Assembly([microbatch.batch_size(p, AXES) for p in parts], AXES)
    for i in reversed(range(count)):  # parts may come back in any order; each lands in its place once
        assert assembly.add(i, outputs[i]) and not assembly.add(i, outputs[i])
        assert assembly.done == (i == 0)
    np.testing.assert_array_equal(assembly.outputs["y"], feeds["x"] * 2)
    np.testing.assert_array_equal(assembly.outputs["state_out"], feeds["state"] + 1)
    # a batch of one part keeps its writable arrays as they came (they are the caller's own); a read-only
    # part (a view of the object store, say) is copied, so the caller always gets writable arrays
    assert np.shares_memory(assembly.outputs["y"], outputs[0]["y"]) == (count == 1)
    readonly = feeds["x"] * 2
    readonly.flags.writeable = False
    one = microbatch.Assembly([n], AXES)
    assert one.add(0, {"y": readonly})
    assert one.outputs["y"].flags.writeable and not np.shares_memory(one.outputs["y"], readonly)


def test_batch_size_checks():
    with pytest.raises(InputError, match="disagree"):
        microbatch.batch_size({"x": np.ones((3, 3)), "state": np.ones((2, 4))}, AXES)
    with pytest.raises(InputError, match="empty batch"):
        microbatch.batch_size({"x": np.ones((0, 3)), "state": np.ones((2, 0))}, AXES)
    assert microbatch.batch_size(_feeds(5), None) == 1


def test_run_tally_keeps_totals_exact_and_memory_bounded():
    from onnxshard.distributed.stats import Tally
    from onnxshard.workers import CallStats

    tally = Tally(2)
    n = Tally.KEEP_CALLS + 5000
    tally.add(CallStats(i % 2, i // 2, 0.0, 0.001, 10) for i in range(n))
    stats = tally.summary(replicas=1, samples=n // 2, micro_batches=n // 2, wall_s=n * 0.001)
    assert [s.micro_batches for s in stats.stages] == [n // 2, n // 2]
    assert stats.stages[0].sent_bytes == 10 * (n // 2)
    assert len(stats.calls) == Tally.KEEP_CALLS  # only the most recent calls are kept for the timeline


def test_cost_meter_fits_per_call_and_per_sample_costs():
    from onnxshard.distributed.stats import CostMeter
    from onnxshard.workers import CallStats

    meter = CostMeter([1, 2])  # stage 1 has two tensor-parallel ranks: its time is their mean
    assert meter.slot_seconds(4) is None
    meter.add([CallStats(0, 0, 0.0, 0.010 + 0.001 * 2, 0), CallStats(1, 0, 0.0, 0.004, 0, rank=0),
               CallStats(1, 0, 0.0, 0.004, 0, rank=1)], samples=2)
    assert meter.stage_seconds(0, 4) == pytest.approx(0.024)  # one size seen: proportional
    meter.add([CallStats(0, 1, 0.0, 0.010 + 0.001 * 8, 0), CallStats(1, 1, 0.0, 0.016, 0, rank=0),
               CallStats(1, 1, 0.0, 0.016, 0, rank=1)], samples=8)
    assert meter.stage_seconds(0, 4) == pytest.approx(0.014)  # 10 ms a call + 1 ms a sample
    assert meter.stage_seconds(1, 4) == pytest.approx(0.008)
    assert meter.slot_seconds(100) == pytest.approx(0.2)  # stage 1 (2 ms a sample) is the slowest there


def test_coalesce_joins_consecutive_requests_and_unmerge_splits_them_back():
    axes = BatchAxes({"x": 0, "state": 1, "table": None}, {"y": 0, "state_out": 1})
    requests = [_feeds(n) for n in (1, 2, 3, 9, 1)]
    requests[4]["table"] = np.zeros(4)  # a different broadcast input: it cannot join the one before
    groups = list(microbatch.coalesce(requests, axes, max_samples=6))
    assert [sizes for _, sizes in groups] == [[1, 2, 3], [9], [1]]  # 9 is over the cap: alone
    joined, sizes = groups[0]
    assert joined["x"].shape == (6, 3) and joined["state"].shape == (2, 6) and joined["table"] is requests[0]["table"]
    outputs = {"y": joined["x"] * 2, "state_out": joined["state"] + 1}
    back = microbatch.unmerge(outputs, axes, sizes)
    for request, out in zip(requests, back):
        np.testing.assert_array_equal(out["y"], request["x"] * 2)
        np.testing.assert_array_equal(out["state_out"], request["state"] + 1)


def _address(a):
    return a.__array_interface__["data"][0]


def test_array_pool_reuses_memory_only_after_every_view_is_gone():
    pool = microbatch.ArrayPool(max_free_bytes=3 * 4096, min_bytes=4096, per_size=2)
    a = pool.empty((32, 32), np.float32)  # 4 KiB: pooled
    assert a.flags.writeable and a.flags.c_contiguous and a.shape == (32, 32) and a.dtype == np.float32
    a[:] = 7.0
    view, where = a[3:], _address(a)
    del a
    b = pool.empty((32, 32), np.float32)
    assert _address(b) != where  # a view still holds the first buffer
    np.testing.assert_array_equal(view, 7.0)
    del view
    c = pool.empty((1024,), np.float32)  # same bytes, any shape and dtype of that size
    assert _address(c) == where and pool.free_bytes == 0
    small = pool.empty((3, 4), np.float64)
    assert type(small.base) is not type(c.base)  # under min_bytes: a plain allocation
    kept = [pool.empty((1024,), np.int32) for _ in range(4)]
    del b, c, kept
    assert pool.free_bytes == 2 * 4096  # at most per_size of one size
    last = pool.empty((1024,), np.int32)
    pool.close()  # the pipeline closed: nothing is kept, not even what comes back later
    del last
    assert pool.free_bytes == 0


def test_assembly_takes_large_outputs_from_the_pool():
    pool = microbatch.ArrayPool(min_bytes=1)
    feeds = _feeds(6)
    parts = microbatch.split(feeds, AXES, 3)
    outputs = [{"y": p["x"] * 2, "state_out": p["state"] + 1} for p in parts]
    first = microbatch.Assembly([3, 3], AXES, pool)
    for i, out in enumerate(outputs):
        first.add(i, out)
    where = _address(first.outputs["y"])
    np.testing.assert_array_equal(first.outputs["y"], feeds["x"] * 2)
    second = microbatch.Assembly([3, 3], AXES, pool)
    for i, out in enumerate(outputs):
        second.add(i, out)
    assert _address(second.outputs["y"]) != where  # the first result is still held
    del first
    third = microbatch.Assembly([3, 3], AXES, pool)
    for i, out in enumerate(outputs):
        third.add(i, out)
    assert _address(third.outputs["y"]) == where
    np.testing.assert_array_equal(third.outputs["y"], feeds["x"] * 2)
    np.testing.assert_array_equal(second.outputs["state_out"], feeds["state"] + 1)


def test_the_in_flight_gauge_is_set_at_most_every_tenth_of_a_second_but_always_when_the_pipeline_empties():
    from onnxshard.distributed.metrics import GAUGE_EVERY_S, PipelineMetrics

    metrics, set_to = PipelineMetrics("m"), []
    metrics._in_flight = type("Recorder", (), {"set": lambda self, value, tags: set_to.append(value)})()
    for count, at in [(3, 0.0), (4, 0.05), (3, 0.09), (2, 0.15), (1, 0.16), (0, 0.17), (1, 0.18), (0, 0.19)]:
        metrics.in_flight(count, now=100 + at)
    assert set_to == [3, 2, 0, 1, 0]
    slow = PipelineMetrics("m")  # changes further apart than the interval: every one is set
    slow._in_flight, set_to[:] = metrics._in_flight, []
    for i, count in enumerate([1, 2, 3, 2]):
        slow.in_flight(count, now=200 + i * 2 * GAUGE_EVERY_S)
    assert set_to == [1, 2, 3, 2]


def test_run_per_micro_batch_runs_each_chunk_and_puts_the_outputs_back_in_order():
    axes = BatchAxes({"x": 0, "table": None}, {"y": 0})
    feeds = {"x": np.arange(10, dtype=np.float32).reshape(5, 2), "table": np.float32([10, 20])}
    sizes = []

    def run(chunk):
        sizes.append(len(chunk["x"]))
        return {"y": chunk["x"] * len(chunk["x"]) + chunk["table"]}  # depends on the chunk's size

    got = microbatch.run_per_micro_batch(run, feeds, axes, 2)["y"]
    assert sizes == [2, 2, 1]
    assert np.array_equal(got, feeds["x"] * np.float32([[2], [2], [2], [2], [1]]) + feeds["table"])

"""Micro-batch sizing as pure functions: the chosen size moves with the measured costs, without Ray."""

import numpy as np
import pytest
import zoo

import onnxshard
from onnxshard.distributed import microbatch
from onnxshard.distributed.sizing import best_size, check_fits, sample_bytes, stream_cap
from onnxshard.errors import InputError


def line(a, b):
    """A stage that costs a + b x samples per micro-batch."""
    return lambda s: a + b * s


def test_a_batch_alone_is_split_more_as_the_pipeline_deepens():
    slot = line(0.0, 1e-3)  # compute proportional to samples, no fixed cost
    sizes = [best_size(64, stages=k, slot=slot, overhead_s=1e-4) for k in (1, 2, 4, 8)]
    assert sizes[0] == 64  # one stage: nothing to overlap, one call is cheapest
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[1]  # more stages, smaller micro-batches


def test_per_call_costs_push_towards_fewer_larger_micro_batches():
    cheap = best_size(64, stages=4, slot=line(0.0, 1e-3), overhead_s=1e-5)
    dear = best_size(64, stages=4, slot=line(0.0, 1e-3), overhead_s=5e-2)
    fixed = best_size(64, stages=4, slot=line(5e-2, 1e-3), overhead_s=1e-5)  # an LSTM's sequential steps
    assert cheap < dear and cheap < fixed


def test_a_long_stream_tends_to_one_micro_batch_per_request():
    slot = line(2e-3, 1e-3)  # each call costs something whatever its size
    first = best_size(16, stages=4, slot=slot, overhead_s=1e-3, requests=1)
    later = best_size(16, stages=4, slot=slot, overhead_s=1e-3, requests=100)
    assert first < later == 16  # the fill and drain are shared with the batches before
    sizes = [best_size(16, stages=4, slot=line(0.0, 1e-3), overhead_s=1e-4, requests=n) for n in (1, 10, 100)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # the same trend when calls cost only their samples


def test_a_size_measured_alone_is_doubled_once_so_a_calls_fixed_cost_shows():
    """Two stages, 8 samples per replica, the first batch cut into micro-batches of 1 (the default split). From one
    size the fit takes the time as proportional to the samples, so micro-batches of 1 look best, and without
    exploring they would be chosen forever. Doubled once, the fit sees two sizes: a stage that pays a fixed cost per
    call (an LSTM's sequential steps) then gets the whole share at once, one that does not goes back to 1."""
    from onnxshard.distributed.sizing import auto_size
    from onnxshard.distributed.stats import CostMeter
    from onnxshard.workers import CallStats

    def measure(meter, size, fixed):  # both stages take fixed + 1 ms a sample per call
        for _ in range(3):
            meter.add([CallStats(k, 0, 0.0, fixed + 1e-3 * size, 0) for k in range(2)], size)

    chosen = {}
    for fixed in (0.0, 20e-3):
        meter = CostMeter([1, 1])
        measure(meter, 1, fixed)
        assert meter.only_size == 1
        assert best_size(8, stages=2, slot=meter.slot_model(), overhead_s=1e-4) == 1  # what one size suggests
        assert auto_size(meter, 8, stages=2, overhead_s=1e-4) == 2  # explored instead
        measure(meter, 2, fixed)
        assert meter.only_size is None
        chosen[fixed] = auto_size(meter, 8, stages=2, overhead_s=1e-4)
    assert chosen == {0.0: 1, 20e-3: 8}, chosen
    assert auto_size(meter, 8, stages=2, overhead_s=1e-4, largest=4) == 4  # within the stream's memory cap


def test_a_stream_cap_bounds_the_size_by_memory():
    cap = stream_cap(1 << 20, stages=2, window=4, byte_limit=48 << 20)  # 1 MiB a sample: 48 MiB / 4 / (3 x 4)
    assert cap == 1
    assert stream_cap(1 << 10, stages=2, window=4, byte_limit=48 << 20) == 1024
    assert best_size(64, stages=2, slot=line(1.0, 0.0), overhead_s=0.0, largest=cap) == 1  # capped


def test_the_memory_check_names_what_it_needs(tmp_path):
    path = zoo.save(zoo.mlp(layers=2, width=16), tmp_path / "m")
    plan = onnxshard.plan(path, tmp_path / "p", stages=2)
    axes = microbatch.infer_batch_axes(plan)
    per_sample = sample_bytes(plan, axes, {"x": np.zeros((5, 16), np.float32)})
    assert per_sample == (16 * 4, 16 * 4)
    check_fits(per_sample, 100, 10, stages=2, window=4, limit=10**6)
    need = r"would need about 19\.2 KB \(19\.2 KB of activations in flight, 6\.4 KB of outputs\), over the 1\.0 KB"
    with pytest.raises(InputError, match=need):
        check_fits(per_sample, 100, 1, stages=2, window=4, limit=1000)
    # a stream asks again per request: answers are kept by dim sizes, and a new size is a new answer
    plan = onnxshard.plan(zoo.save(zoo.transformer(layers=2), tmp_path / "t"), tmp_path / "tp", stages=2)
    axes, cache = microbatch.infer_batch_axes(plan), {}
    feeds = {seq: {"x": np.zeros((2, seq, 32), np.float32)} for seq in (5, 9)}
    fresh = {seq: sample_bytes(plan, axes, f) for seq, f in feeds.items()}
    assert fresh[9][0] > fresh[5][0]
    for seq in (5, 9, 5):
        assert sample_bytes(plan, axes, feeds[seq], cache) == fresh[seq]
    assert len(cache) == 2


def test_the_cost_meter_keeps_a_bounded_table_of_sizes():
    from onnxshard.distributed.stats import CostMeter
    from onnxshard.workers import CallStats

    meter = CostMeter([1, 1])
    for samples in range(1, 500):  # a long-lived pipeline sees many request sizes
        meter.add([CallStats(k, 0, 0.0, 1e-3 * samples, 0) for k in (0, 1)], samples)
    assert all(len(sizes) == CostMeter.SIZES for sizes in meter.by_size)
    assert max(meter.by_size[0]) == 499  # the recent ones are kept
    a, b = meter.fit(0)
    assert b == pytest.approx(1e-3, rel=1e-6) and a == pytest.approx(0.0, abs=1e-9)  # the fit still holds


def test_the_imbalance_rule_names_the_slowest_stage_only_past_the_threshold():
    from onnxshard.distributed.stats import imbalance

    assert imbalance([1.0, 1.1]) is None  # 1.05x the mean
    found = imbalance([3.0, 1.0])
    assert (found.slowest, round(found.ratio, 2), found.shares) == (0, 1.5, (0.75, 0.25))
    assert imbalance([1.0, 3.0]).slowest == 1  # the answer moves with the inputs
    assert imbalance([1.0, 1.0, 1.9]).slowest == 2  # 1.46x the mean of three
    assert imbalance([1.3, 1.0], threshold=1.2) is None and imbalance([1.3, 1.0], threshold=1.1).slowest == 0
    assert imbalance([4.0, 2.0], ranks=[2, 1]) is None  # a 2-rank stage's busy time is per rank
    assert imbalance([5.0]) is None and imbalance([0.0, 0.0]) is None
    text = found.advice("/m/model.onnx")
    assert "stage 0 is the bottleneck: 1.50x" in text and "75% / 25%" in text
    assert "onnxshard plan /m/model.onnx --out NEW_PLAN --stages 2 --profile" in text


def test_the_plan_shape_for_a_worker_budget_follows_costs_and_memory():
    from onnxshard.partitioner.cuts import choose_shape

    even, light = [1.0] * 8, [1] * 8
    cut = np.zeros(8)
    assert choose_shape(even, light, cut, 2) == (1, 2)  # equal predictions: replicas, no bubble, no hops
    assert choose_shape(even, [10] * 8, cut, 2, max_memory=45) == (2, 1)  # a memory cap forces stages
    assert choose_shape(even, [10] * 8, cut, 4, max_memory=45) == (2, 2)
    assert choose_shape(even, [10] * 8, cut, 4, max_memory=25) == (4, 1)
    assert choose_shape(even, [10] * 8, cut, 3, max_memory=25) is None  # 4 stages needed, 3 workers
    one_big = [1.0, 20.0, 1.0, 1.0]  # one node is most of the work: pipelining cannot balance it
    assert choose_shape(one_big, [1] * 4, np.zeros(4), 4) == (1, 4)
    assert choose_shape(one_big, [1] * 4, np.zeros(4), 4, degree=2) == (1, 2)  # each stage takes 2 ranks
    assert choose_shape(one_big, [10, 10, 10, 10], np.zeros(4), 4, max_memory=20) == (2, 2)


def test_a_stage_pays_for_the_bytes_it_sends_so_a_large_output_pulls_the_cut_later():
    """Ten equal nodes; the last stage also sends the graph's output on. The larger that output, the fewer nodes
    the last stage keeps, so both stages cost the same; without the per-byte costs the cut stays in the middle."""
    from onnxshard.partitioner.cuts import boundary_costs, choose_bounds

    cost, params, edges = [1.0] * 10, [0] * 10, (1.0, 0.5)  # per byte sent, per byte received
    got = []
    for output in (0.0, 2.0, 4.0, 6.0):
        cut = np.full(11, 0.1)  # 0.1 bytes cross each cut
        cut[0], cut[10] = 0.0, output
        bounds = choose_bounds(cost, params, cut, 2, edges=edges)
        assert choose_bounds(cost, params, cut, 2) == [0, 5, 10]  # nodes alone
        boundary = boundary_costs(cut, bounds, edges)
        assert boundary == pytest.approx([0.1 * 1.0, 0.1 * 0.5 + output * 1.0])  # sends 0.1; reads 0.1, sends out
        totals = [sum(cost[a:b]) + e for a, b, e in zip(bounds, bounds[1:], boundary)]
        assert max(totals) - min(totals) <= 1.0, (output, totals)  # balanced within one node
        got.append(bounds[1])
    assert got == [5, 6, 7, 8], got


def test_plan_for_workers_records_the_replicas(save_model, tmp_path):
    path = save_model(zoo.transformer(layers=4), external=True)
    plan = onnxshard.plan(path, tmp_path / "w2", workers=2)
    assert (plan.num_stages, plan.replicas) == (1, 2) and "replicas: 2" in plan.table()
    assert onnxshard.load_plan(plan.root).replicas == 2
    whole = plan.stages[0].param_bytes
    capped = onnxshard.plan(path, tmp_path / "capped", workers=4, max_stage_memory=int(whole * 0.6))
    assert (capped.num_stages, capped.replicas) == (2, 2)
    with pytest.raises(onnxshard.PlanError, match="--workers 1 cannot hold one copy of 2 stage"):
        onnxshard.plan(path, tmp_path / "bad", workers=1, stages=2)

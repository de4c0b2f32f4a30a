"""The coordinator's pure rules, without Ray: joining requests, waiting for more, the bounded queue, call
deadlines and the restart budget. Each rule is driven with varied inputs and its answer must move with them."""

import threading
import time

import numpy as np
import pytest

from onnxshard.distributed.limits import FIRST_CALL_S, MIN_DEADLINE_S, RestartBudget, call_deadline
from onnxshard.distributed.microbatch import BatchAxes
from onnxshard.distributed.requests import Request, RequestQueue, join_key, joinable, wait_for_more
from onnxshard.errors import OverloadedError

AXES = BatchAxes({"x": 0, "scale": None}, {"y": 0})


def request(rows=1, width=4, scale=1.0, enqueued=0.0, axes=AXES):
    feeds = {"x": np.zeros((rows, width), np.float32), "scale": np.array([scale], np.float32)}
    return Request(feeds, rows, join_key(feeds, axes), enqueued=enqueued)


def test_join_keys_follow_non_batch_dims_dtypes_and_broadcast_values():
    assert request(1).key == request(7).key  # the batch dim may differ
    assert request(1, width=4).key != request(1, width=5).key
    assert request(1, scale=1.0).key != request(1, scale=2.0).key
    assert request(1, axes=None).key is None  # batch axis unknown: never joined


def test_joinable_takes_same_key_requests_up_to_the_batch_size():
    q = [request(2), request(3), request(4), request(1)]
    assert joinable(q, None) == 1 and joinable(q, 1) == 1  # joining off
    assert joinable(q, 5) == 2  # 2 + 3; 4 more would pass 5
    assert joinable(q, 9) == 3
    assert joinable(q, 64) == 4
    assert joinable([request(2), request(2, width=5), request(2)], 64) == 1  # FIFO: stops at the first mismatch
    alone = request(2)
    alone.alone = True
    assert joinable([alone, request(2)], 64) == 1 and joinable([request(2), alone], 64) == 1
    assert joinable([request(10), request(1)], 4) == 1  # a request bigger than the batch size goes alone


def test_wait_for_more_only_while_idle_and_the_batch_can_grow():
    q = [request(1, enqueued=10.0), request(1, enqueued=10.002)]
    assert wait_for_more(q, 10.003, 8, 0.005, idle=True) == pytest.approx(0.002)
    assert wait_for_more(q, 10.006, 8, 0.005, idle=True) == 0  # the oldest has waited its delay
    assert wait_for_more(q, 10.003, 8, 0.005, idle=False) == 0  # a busy pipeline takes what is there
    assert wait_for_more(q, 10.003, 2, 0.005, idle=True) == 0  # already full
    assert wait_for_more(q, 10.003, 8, 0.0, idle=True) == 0  # no delay configured
    assert wait_for_more(q + [request(1, width=5)], 10.003, 8, 0.005, idle=True) == 0  # the rest cannot join


def test_a_full_queue_refuses_at_once_and_takes_batches_in_order():
    queue = RequestQueue(max_size=3)
    for rows in (1, 2, 3):
        queue.put(request(rows))
    started = time.monotonic()
    with pytest.raises(OverloadedError, match="overloaded: 3 requests"):
        queue.put(request(1))
    assert time.monotonic() - started < 1
    queue.put(request(9), front=True)  # a retry goes first, even when full
    assert [r.samples for r in queue.take(None, 0, idle=True, timeout=0)] == [9]
    assert [r.samples for r in queue.take(3, 0, idle=True, timeout=0)] == [1, 2]
    assert [r.samples for r in queue.take(3, 0, idle=True, timeout=0)] == [3]
    assert queue.take(3, 0, idle=True, timeout=0.01) == []


def test_take_waits_for_a_second_request_to_join_an_idle_pipeline():
    queue = RequestQueue(max_size=10)
    queue.put(request(1))
    threading.Timer(0.05, lambda: queue.put(request(1))).start()
    got = queue.take(8, max_delay_s=2.0, idle=True, timeout=1)
    assert len(got) == 2  # joined: the delay let the second one arrive
    queue.put(request(1))
    assert len(queue.take(8, max_delay_s=0.0, idle=True, timeout=1)) == 1  # no delay: goes at once


def test_cancelled_requests_are_dropped_and_close_hands_back_the_rest():
    queue = RequestQueue(max_size=10)
    gone, kept = request(1), request(2)
    queue.put(gone)
    queue.put(kept)
    gone.future.cancel()
    assert queue.take(None, 0, idle=True, timeout=0) == [kept]
    queue.put(request(3))
    assert [r.samples for r in queue.close()] == [3]
    with pytest.raises(OverloadedError, match="closed"):
        queue.put(request(1))


def test_call_deadline_follows_measured_times():
    assert call_deadline(5.0, 100.0) == 5.0  # configured wins
    assert call_deadline(None, None) == FIRST_CALL_S  # nothing measured yet
    assert call_deadline(None, 0.01) == MIN_DEADLINE_S
    assert call_deadline(None, 3.0) == 60.0
    assert call_deadline(None, 3.0, expected_s=10.0) == 200.0  # a bigger micro-batch is expected to take longer


def test_restart_budget_is_per_window():
    now = [0.0]
    budget = RestartBudget(max_restarts=3, window_s=600, clock=lambda: now[0])
    for _ in range(3):  # a crash loop: four in a minute passes the budget
        now[0] += 10
        last = budget.spend((0, 1))
    assert last == 3 and budget.spend((0, 1)) == 4
    assert budget.spend((0, 2)) == 1  # per worker
    now[0] += 3600  # rare crashes spread over time never pass it
    for _ in range(10):
        now[0] += 601
        assert budget.spend((0, 1)) == 1
    assert budget.recent((0, 1)) == 1

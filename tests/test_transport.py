"""The two transports between stages: direct links (Arrow IPC frames over Unix sockets, or TCP between nodes) and
Ray actor calls."""

import glob
import os
import signal
import socket
import struct
import tempfile
import threading
import time

import actors
import numpy as np
import pyarrow
import pytest
import zoo

import onnxshard
from onnxshard import PlanError
from onnxshard.distributed import Pipeline
from onnxshard.distributed.links import HOLD_OVER, DirectLinks, Woken
from onnxshard.runtime import arrow, frames, shared_frames, tools
from onnxshard.workers import CallStats, Failure
from onnxshard.workers.rank_mesh import RankMesh
from onnxshard.workers.stage_worker import packet_from_frame, packet_to_frame


def test_frames_round_trip_tensors_failures_and_calls():
    a, b = socket.socketpair()
    with a, b:
        tensors = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "flag": np.array([True, False]),
                   "empty": np.zeros((0, 5), np.int64), "scalar": np.array(3.5, np.float64)}
        calls = (CallStats(0, 7, 1.5, 0.25, 96),)
        frames.send_frame(a, 7, *packet_to_frame((arrow.encode(tensors), calls)))
        frames.send_frame(a, 8, *packet_to_frame((Failure(1, 8, "stage 1 broke", "InputError"), calls)))
        mb, batch, meta = frames.recv_frame(b)
        data, got_calls = packet_from_frame(batch, meta)
        assert mb == 7 and got_calls == calls
        for name, value in arrow.decode(data).items():
            assert value.dtype == tensors[name].dtype and np.array_equal(value, tensors[name])
            assert not value.flags.writeable or not value.size  # views the received buffer, unless asked (below)
        writable = arrow.decode(data, writable=True)
        for name, value in writable.items():  # the frame's own buffer: writable views, no copies
            assert value.flags.writeable and np.array_equal(value, tensors[name])
        writable["x"][0, 0, 0] = -1.0
        assert arrow.decode(data)["x"][0, 0, 0] == -1.0 and writable["scalar"] == 3.5
        mb, batch, meta = frames.recv_frame(b)
        assert mb == 8 and packet_from_frame(batch, meta) == (Failure(1, 8, "stage 1 broke", "InputError"), calls)
        a.sendall(struct.pack("<4sqq", b"HTTP", 1, 2))
        with pytest.raises(ConnectionError, match="not an onnxshard frame"):
            frames.recv_frame(b)
        a.close()
        with pytest.raises(frames.LinkClosed):
            frames.recv_frame(b)


def test_a_frames_size_is_counted_exactly_without_writing_it():
    """The header announces the payload's size before it is written (a frame's stream is written once, straight
    into the socket), so the count must equal what the IPC writer writes, for every kind of column."""
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "odd": np.arange(7, dtype=np.int8),
               "flag": np.array([True, False, True]), "empty": np.zeros((0, 5), np.int64),
               "words": np.array(["a", "longer word", ""], dtype=object), "half": np.ones(3, np.float16)}
    sliced = arrow.encode({"x": np.arange(40, dtype=np.float64)}).slice(0, 1)
    batches = [None, arrow.encode(tensors), sliced, *(arrow.encode({k: v}) for k, v in tensors.items())]
    for batch in batches:
        for meta in ({}, {"calls": [[0, 1, 2.5]], "held": True}):
            framed, size = frames._framed(batch, meta)
            assert size == frames._write_ipc(pyarrow.BufferOutputStream(), framed).getvalue().size
    a, b = socket.socketpair()
    with a, b:  # and the reader takes exactly that many bytes per frame: two in a row stay in step
        for i, batch in enumerate(batches[:3]):
            frames.send_frame(a, i, batch, {"i": i})
        assert [frames.recv_frame(b)[2] for _ in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_wakeable_wait_for_a_result_ends_on_wake_and_a_plain_one_does_not():
    """The coordinator waits for its oldest micro-batch in a wakeable take; a caller that queues a request while
    the window has room wakes it, so the request is sent at once instead of when that micro-batch is back."""
    links = DirectLinks([], [], 1.0, 4)
    try:
        links.wake()  # before the wait: kept for the next wakeable take, once
        with pytest.raises(Woken):
            links.take(0, 1, 5.0, wakeable=True)
        with pytest.raises(TimeoutError):
            links.take(0, 1, 0.05, wakeable=True)
        links.wake()
        with pytest.raises(TimeoutError):  # a plain take (generation's) waits on
            links.take(0, 1, 0.05)
        with pytest.raises(Woken):
            links.take(0, 1, 5.0, wakeable=True)
        threading.Timer(0.1, links.wake).start()  # during the wait
        t0 = time.monotonic()
        with pytest.raises(Woken):
            links.take(0, 1, 30.0, wakeable=True)
        assert time.monotonic() - t0 < 10
    finally:
        links.close()


def test_a_tcp_link_carries_the_same_frames_and_admits_only_the_peer_with_the_token():
    token = b"t" * 16
    server = frames.listen("onnxshard-test-", timeout=5.0, host="127.0.0.1")
    where = frames.address(server)
    assert where.startswith("tcp://127.0.0.1:") and server.family == socket.AF_INET
    with server:
        strangers = [frames.connect(where, token=b"x" * 16), socket.create_connection(server.getsockname()[:2])]
        strangers[1].sendall(b"GET / HTTP/1.1\r\n\r\n")  # not even a token: dropped too
        a = frames.connect(where, token=token)
        b = frames.accept(server, token)  # the strangers came first and were turned away
        with a, b:
            for stranger in strangers:  # their connections were closed (or reset, with bytes unread) at once
                stranger.settimeout(5.0)
                try:
                    assert stranger.recv(1) == b""
                except ConnectionResetError:
                    pass
                stranger.close()
            assert b.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) and a.getsockopt(socket.IPPROTO_TCP,
                                                                                          socket.TCP_NODELAY)
            x = np.arange(300_000, dtype=np.float32).reshape(3, 100_000)  # larger than one TCP segment
            frames.send_frame(a, 5, arrow.encode({"x": x}), {"calls": []})
            mb, batch, meta = frames.recv_frame(b)
            assert mb == 5 and meta == {"calls": []} and np.array_equal(arrow.decode(batch)["x"], x)
        server.settimeout(0.3)
        with frames.connect(where, token=b"y" * 16), pytest.raises(TimeoutError):
            frames.accept(server, token)  # nobody with the token: the wait ends with the server's timeout


def test_a_unix_link_also_wants_the_token():
    token = b"u" * 16
    server = frames.listen("onnxshard-test-", timeout=0.5)
    path = frames.address(server)
    assert path == server.getsockname() and server.family == socket.AF_UNIX
    with server:
        with frames.connect(frames.address(server), token=b"v" * 16), pytest.raises(TimeoutError):
            frames.accept(server, token)
        with frames.connect(frames.address(server), token=token) as a, frames.accept(server, token) as b:
            frames.send_frame(a, 1, None, {"free": ["s"]})
            assert frames.recv_frame(b)[2] == {"free": ["s"]}
    frames.close([], [path])
    assert not os.path.exists(os.path.dirname(path))


@pytest.mark.skipif(frames._SIOCOUTQ is None, reason="the free send buffer is read with Linux's SIOCOUTQ")
def test_frame_sender_writes_what_fits_at_once_queues_the_rest_in_order_and_never_blocks():
    server = frames.listen("onnxshard-test-")
    a = frames.connect(server.getsockname())
    b, _ = server.accept()
    errors = []
    sender = frames.FrameSender(a, errors.append)
    room = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
    small = arrow.encode({"x": np.arange(1000, dtype=np.float32)})
    big = arrow.encode({"x": np.ones(room // 2 + 1024, np.float32)})  # more than the socket holds unread
    with a, b, server:
        sender.send(1, small, {})  # fits: written by this thread, straight into the kernel
        assert frames._outq(a) > 0 and sender._unsent == 0
        for mb in (2, 3):  # nobody reads yet: the big frame waits for the sender thread, and the small one behind it
            sender.send(mb, big if mb == 2 else small, {})
        assert sender._unsent == 2
        got = [frames.recv_frame(b) for _ in range(3)]
        assert [mb for mb, _, _ in got] == [1, 2, 3]
        assert np.array_equal(arrow.decode(got[1][1])["x"], arrow.decode(big)["x"])
        sender.send(4, big, {})
        b.close()  # the reader goes away with a frame still queued: the sender's thread reports it
        for _ in range(200):
            if errors:
                break
            time.sleep(0.01)
        assert errors and isinstance(errors[0], OSError)


def _linked_meshes(folder, shared: bool) -> list[RankMesh]:
    """Two ranks' meshes in this process, linked (rank 1 joins from a thread)."""
    meshes = [RankMesh(r, 2, folder, None, b"t" * 16, shared=shared) for r in range(2)]
    joining = threading.Thread(target=meshes[1].join, args=([m.path for m in meshes],))
    joining.start()
    meshes[0].join([m.path for m in meshes])
    joining.join(timeout=30)
    return meshes


@pytest.mark.skipif(not shared_frames.AVAILABLE, reason="shared frames need Linux (memfd, descriptor passing)")
def test_ranks_on_one_node_send_frames_through_shared_memory_and_the_socket_when_a_slot_is_held(monkeypatch):
    monkeypatch.setattr(shared_frames, "SLOT_BYTES", 64 << 10)  # small slots: a frame over the room is easy to make
    with tempfile.TemporaryDirectory() as folder:
        meshes = _linked_meshes(folder, shared=True)
        assert meshes[0].kinds == {1: "shared"} and meshes[1].kinds == {0: "shared"}
        out = meshes[0]._senders[1]._shared
        rng = np.random.default_rng(0)
        small = [arrow.encode({"x": rng.standard_normal(1000).astype(np.float32)}) for _ in range(4)]
        big = arrow.encode({"x": rng.standard_normal(20_000).astype(np.float32)})  # 80 KB: over a slot
        sent = [small[0], small[1], small[2], big, small[3]]
        for i, batch in enumerate(sent[:3]):  # nothing read yet: two slots fill, the third frame takes the socket
            meshes[0].send(1, i, batch, {"i": i})
        assert out._sent == 2
        got = [meshes[1].receive(0, i) for i in range(3)]  # in order, whichever way each came
        meshes[0].send(1, 3, big, {"i": 3})  # too big for a slot: the socket
        meshes[0].send(1, 4, small[3], {"i": 4})  # the slots are free again (copied out at receive)
        assert out._sent == 3
        got += [meshes[1].receive(0, i) for i in (3, 4)]
        for i, (mb, batch, meta) in enumerate(got):
            assert mb == i and meta == {"i": i}
            x = arrow.decode(batch, writable=True)["x"]
            assert x.flags.writeable and np.array_equal(x, arrow.decode(sent[i])["x"])  # its own buffer
        meshes[1].send(0, 7, small[0], {})  # and the other way
        assert np.array_equal(arrow.decode(meshes[0].receive(1, 7)[1])["x"], arrow.decode(small[0])["x"])
        plain = _linked_meshes(folder, shared=False)
        assert plain[0].kinds == {1: "unix"}
        for m in meshes + plain:
            m.close()


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transport")
    path = zoo.save(zoo.transformer(layers=4), tmp / "model")
    return path, onnxshard.plan(path, tmp / "p", stages=3), onnxshard.plan(path, tmp / "tp", stages=1,
                                                                           tensor_parallel=2)


def _batches(plan, n=12):
    return [tools.random_feeds(plan.inputs, dims={"batch": 1 + i % 4, "seq": 5}, seed=i) for i in range(n)]


@pytest.mark.usefixtures("ray_session")
def test_direct_and_ray_transports_give_ort_results(plans):
    path, plan, _ = plans
    batches = _batches(plan)
    references = [tools.run_model(path, f) for f in batches]
    for transport in ("direct", "ray"):
        with Pipeline(plan, micro_batch_size=2, replicas=2, cpus_per_stage=0.25, transport=transport) as pipe:
            assert pipe.transport == transport
            for results in (list(pipe.stream(batches)), list(pipe.stream(batches, coalesce=5))):
                assert len(results) == len(references)
                for ref, got in zip(references, results):
                    assert tools.max_differences(ref, got) == {"y": 0.0}
                # callers get writable arrays of their own, as from ORT (one-part results are not copied on
                # direct links: they are the received frame's buffer)
                ys = [got["y"] for got in results]
                assert all(y.flags.writeable for y in ys)
                assert not any(np.shares_memory(a, b) for i, a in enumerate(ys) for b in ys[i + 1:])
            assert {c.stage for c in pipe.stats.calls} == {0, 1, 2}
            assert pipe.stats.delivered == pipe.stats.micro_batches and not pipe.recoveries


@pytest.mark.usefixtures("ray_session")
def test_auto_transport_is_direct_on_one_node_tensor_parallel_stages_included(plans):
    import ray

    path, plan, tp_plan = plans
    feeds = _batches(plan, 1)[0]
    with Pipeline(plan, cpus_per_stage=0.25) as pipe:
        assert pipe.transport == "direct"
    with Pipeline(tp_plan, cpus_per_stage=0.25) as pipe:
        assert pipe.transport == "direct"  # rank 0 in the chain, the ranks reduce over their own sockets
        assert tools.max_differences(tools.run_model(path, feeds), pipe.run(feeds))["y"] <= 1e-5
        kind = "shared" if shared_frames.AVAILABLE else "unix"  # the partials in shared memory, on Linux
        assert [ray.get(w.mesh_kinds.remote()) for w in pipe.workers[0][0]] == [{1: kind}, {0: kind}]
    with pytest.raises(PlanError, match="transport must be one of"):
        Pipeline(plan, transport="tcp")


@pytest.mark.usefixtures("ray_session")
def test_a_stopped_middle_stage_is_found_replaced_and_its_micro_batches_resent(plans):
    """SIGSTOP (no socket closes, the link just goes quiet): the call deadline finds the worker by probing."""
    path, plan, _ = plans
    batches = _batches(plan, 30)
    references = [tools.run_model(path, f) for f in batches]
    with Pipeline(plan, micro_batch_size=1, cpus_per_stage=0.25, call_timeout_s=2, transport="direct") as pipe:
        stopped = pipe.worker_info[0][1][0]["pid"]
        results = []
        for i, got in enumerate(pipe.stream(batches)):
            results.append(got)
            if i == 5:
                os.kill(stopped, signal.SIGSTOP)
        assert len(results) == len(references)
        for ref, got in zip(references, results):
            assert tools.max_differences(ref, got) == {"y": 0.0}
        assert pipe.recoveries[-1].stage == 1 and "call deadline" in pipe.recoveries[-1].cause
        assert pipe.stats.delivered == pipe.stats.micro_batches
        assert pipe.worker_info[0][1][0]["pid"] != stopped  # the stopped one was killed


@pytest.mark.usefixtures("ray_session")
def test_link_folders_are_removed_at_close_even_for_killed_workers(plans):
    _, plan, _ = plans
    pattern = os.path.join(tempfile.gettempdir(), "onnxshard-*")
    before = set(glob.glob(pattern))
    with Pipeline(plan, micro_batch_size=1, cpus_per_stage=0.25, transport="direct") as pipe:
        (mine,) = set(glob.glob(pattern)) - before  # one folder per pipeline, holding every socket folder
        assert len(os.listdir(mine)) == 3 + 1  # a socket folder per worker and the coordinator's
        victim = pipe.workers[0][2][0]
        actors.kill(victim)  # dead before the run: a first run takes ~20 ms, less than ray.kill may take to land
        feeds = _batches(plan, 1)[0]
        pipe.run(feeds)
        assert len(pipe.recoveries) == 1 and pipe.recoveries[0].stage == 2
    assert set(glob.glob(pattern)) - before == set()


@pytest.mark.usefixtures("ray_session")
def test_large_activations_stay_exact(tmp_path):
    """Frames of many socket buffers each (1 MiB a sample): the worker's reader, compute and sender threads overlap;
    the last stage's results of 4 samples (4 MiB, over HOLD_OVER) are held and fetched through the object store,
    the last one of 2 samples goes through the socket."""
    from onnx import TensorProto, helper

    width = 1 << 18  # one sample is 1 MiB at each hop
    assert 4 * width * 4 >= HOLD_OVER > 2 * width * 4
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Sqrt", ["h"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])])
    path = zoo.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m")
    plan = onnxshard.plan(path, tmp_path / "p", cuts=["h"])
    feeds = {"x": -np.random.default_rng(1).random((10, width), np.float32)}
    expected = tools.run_model(path, feeds)
    with Pipeline(plan, micro_batch_size=4, cpus_per_stage=0.25, transport="direct") as pipe:
        got = pipe.run(feeds)
        assert tools.max_differences(expected, got) == {"y": 0.0}
        assert got["y"].flags.writeable and pipe.stats.micro_batches == 3
        # large outputs come from a pool: a result still held keeps its memory, a dropped one's is used again
        where = got["y"].__array_interface__["data"][0]
        held = pipe.run(feeds)
        assert held["y"].__array_interface__["data"][0] != where
        del got
        again = pipe.run(feeds)
        assert again["y"].__array_interface__["data"][0] == where
        assert tools.max_differences(expected, again) == tools.max_differences(expected, held) == {"y": 0.0}
        # the last stage dies holding results: they are recomputed, each delivered once
        killed = []

        def kill_last(done, submitted):
            if done == 3 and not killed:
                killed.append(pipe.worker_info[0][1][0]["pid"])
                os.kill(killed[0], signal.SIGKILL)

        results = list(pipe.stream([feeds] * 4, progress=kill_last))
        assert killed and all(tools.max_differences(expected, r) == {"y": 0.0} for r in results)
        assert pipe.stats.delivered == pipe.stats.micro_batches == 12 and pipe.recoveries[-1].stage == 1

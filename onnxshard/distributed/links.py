"""The coordinator's ends of the direct transport: one chain of sockets per replica, each hop a Unix socket
between processes of one node and TCP between nodes.

Per replica the coordinator writes each micro-batch into stage 0's socket (a frame too large for the socket's
free buffer through a sender thread, so the coordinator never waits on stage 0) and a reader thread takes finished
micro-batches off the last stage's socket; Ray only starts, links and watches the workers. A hop costs an Arrow
IPC write and a socket copy instead of an actor call (benchmarks/RESULTS.md). A large result of the last stage
(``HOLD_OVER`` bytes or more, such as full-vocabulary logits) stays in that worker and the coordinator fetches it
with one actor call, so it comes through Ray's shared-memory object store instead of two socket copies. A broken
link (a worker died) surfaces as :class:`LinkBroken`; the pipeline then replaces the dead worker, relinks the
replica and resends what it had not got back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time

import ray

from onnxshard.runtime import frames
from onnxshard.workers.packets import packet_from_frame, packet_to_frame

HOLD_OVER = 4 << 20  # results this large cost less through Ray's object store than through a socket (RESULTS.md)


class LinkBroken(ConnectionError):
    """A replica's chain of links broke: a worker died or closed its link."""


class Woken(Exception):
    """A wakeable :meth:`DirectLinks.take` was ended by :meth:`DirectLinks.wake`: its caller has other work."""


class _Chain:
    """One replica's coordinator-side sockets and reader thread."""

    def __init__(self, replica: int, last, paths: list[str], on_frame, on_break, accept_timeout_s: float,
                 folder: str | None, host: str | None, token: bytes):
        self.replica = replica
        self.last = last  # the last stage's worker, which holds large results
        self.paths = paths  # the workers' sockets, in stage order
        self.folder, self.token = folder, token
        self.server = frames.listen("onnxshard-coord-", accept_timeout_s, folder, host)
        self.path = frames.address(self.server)
        self.to_first: socket.socket | None = None
        self.back: socket.socket | None = None
        self.sender: frames.FrameSender | None = None
        self._on_frame, self._on_break = on_frame, on_break

    def connect(self) -> None:
        # Stage 0 reads its next frame once it is done with the one before, so a large frame may wait for it: the
        # sender's thread waits then, never the coordinator (which watches the workers for hangs meanwhile).
        self.to_first = frames.connect(self.paths[0], token=self.token)
        self.back = frames.accept(self.server, self.token)
        self.sender = frames.FrameSender(self.to_first, lambda e: self._on_break(self, _describe(e)),
                                         name=f"onnxshard-chain-{self.replica}-sender")
        threading.Thread(target=self._read, name=f"onnxshard-chain-{self.replica}", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self._on_frame(self, *frames.recv_frame(self.back))
        except Exception as e:  # noqa: BLE001 - any end of the stream breaks the chain
            self._on_break(self, _describe(e))

    def close(self) -> None:
        # A live worker removes its own link folder when it relinks; a killed one cannot: those in the folder are
        # on this node (a worker on another node keeps its own, which its node's temp cleaning removes).
        mine = [p for p in [self.path, *self.paths] if self.folder and p.startswith(self.folder + os.sep)]
        frames.close([self.to_first, self.back, self.server], mine)
        if self.sender is not None:
            self.sender.close()


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class DirectLinks:
    """Per replica, a chain coordinator -> stage 0 -> ... -> stage K-1 -> coordinator: each hop a Unix socket when
    both ends are on one node, else TCP. ``kinds[replica]`` says which, hop by hop."""

    def __init__(self, rows: list[list[list]], nodes: list[list[list[str]]], timeout_s: float, keep: int):
        self.timeout_s = timeout_s
        self.folder: str | None = None
        self.keep = keep  # results a last stage may hold at once: the coordinator's in-flight window
        self._chains: dict[int, _Chain] = {}
        self._broken: dict[int, str] = {}
        self._results: dict[int, tuple] = {}
        self._wanted: set[int] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._woken = False  # see wake()
        self.token = secrets.token_bytes(16)  # a link admits only a peer that sends this (TCP is open to the network)
        self.kinds: dict[int, list[str]] = {}
        try:
            # every socket of these chains lives in one private folder: close() removes it, whatever became of
            # the workers (a killed one cannot remove its own)
            self.folder = tempfile.mkdtemp(prefix="onnxshard-links-")
            for replica, (row, where) in enumerate(zip(rows, nodes)):
                self.connect(replica, row, where)
        except BaseException:
            self.close()
            raise

    def connect(self, replica: int, row: list[list], nodes: list[list[str]]) -> list:
        """(Re)link ``replica``'s stage workers ``row`` (per stage, its ranks' workers, running on ``nodes``) into a
        chain through each stage's rank 0, each tensor-parallel stage's ranks into a mesh.
        Results held by a last stage that has been replaced are forgotten (their micro-batches count as not back,
        to be resent); returns the fetches of them that were under way, which fail with the old worker."""
        self.drop(replica)
        workers = [ranks[0] for ranks in row]
        with self._cond:
            lost = [mb for mb, (batch, _, chain) in self._results.items() if chain.replica == replica
                    and isinstance(batch, ray.ObjectRef) and chain.last is not workers[-1]]
            fetches = [self._results.pop(mb)[0] for mb in lost]
        here = ray.get_runtime_context().get_node_id()
        self._mesh(row, nodes, here)
        nodes = [where[0] for where in nodes]  # the chain runs through each stage's rank 0
        tcp = [a != b for a, b in zip([here, *nodes], [*nodes, here])]  # hop i enters stage i; the last, here
        paths = ray.get([w.open_link.remote(self.folder if node == here else None, tcp[i], self.token)
                         for i, (w, node) in enumerate(zip(workers, nodes))], timeout=self.timeout_s)
        chain = _Chain(replica, workers[-1], paths, self._arrived, self._break, self.timeout_s, self.folder,
                       ray.util.get_node_ip_address() if tcp[-1] else None, self.token)
        try:
            ray.get([w.start_link.remote(paths[i + 1]) for i, w in enumerate(workers[:-1])] +
                    [workers[-1].start_link.remote(chain.path, HOLD_OVER, self.keep)], timeout=self.timeout_s)
            chain.connect()
        except BaseException:
            chain.close()
            raise
        with self._cond:
            self._chains[replica] = chain
            self._broken.pop(replica, None)
            self.kinds[replica] = ["tcp" if t else "unix" for t in tcp]
        return fetches

    def _mesh(self, row: list[list], nodes: list[list[str]], here: str) -> None:
        """Link the ranks of each tensor-parallel stage of ``row`` each to each (``rank_mesh.py``): Unix sockets
        when they share a node, else TCP."""
        for ranks, where in zip(row, nodes):
            if len(ranks) == 1:
                continue
            one = len(set(where)) == 1
            folder = self.folder if one and where[0] == here else None
            addresses = ray.get([w.open_mesh.remote(folder, not one, self.token) for w in ranks],
                                timeout=self.timeout_s)
            ray.get([w.join_mesh.remote(addresses) for w in ranks], timeout=self.timeout_s)

    def drop(self, replica: int) -> None:
        chain = self._chains.pop(replica, None)
        if chain is not None:
            chain.close()

    def close(self) -> None:
        """Close every chain and wake whoever waits in :meth:`take` (it raises :class:`LinkBroken`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for replica in list(self._chains):
            self.drop(replica)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def send(self, replica: int, micro_batch: int, packet: tuple) -> None:
        """Write a micro-batch into the replica's chain; raises :class:`LinkBroken` if the chain is down."""
        self.send_frame(replica, micro_batch, *packet_to_frame(packet))

    def send_frame(self, replica: int, micro_batch: int, batch, meta: dict, *, want: bool = True) -> None:
        """Write a frame (a batch and its JSON-able metadata) into the replica's chain; with ``want`` False, what
        comes back of it is dropped."""
        with self._cond:
            if want:
                self._wanted.add(micro_batch)
            chain = self._chains.get(replica)
            broken = self._broken.get(replica)
        if chain is None or broken:
            raise LinkBroken(broken or f"replica {replica} is not linked")
        try:
            chain.sender.send(micro_batch, batch, meta)
        except OSError as e:
            self._break(chain, f"sending micro-batch {micro_batch}: {type(e).__name__}: {e}")
            raise LinkBroken(self._broken.get(replica, str(e))) from None

    def wait_any(self, micro_batches, timeout: float) -> list[int]:
        """Those of ``micro_batches`` whose results are here, waiting up to ``timeout`` s for one (a broken chain
        or closed links end the wait: ``take`` then raises)."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                here = [mb for mb in micro_batches if mb in self._results]
                left = end - time.monotonic()
                if here or left <= 0 or self._closed or self._broken:
                    return here or ([next(iter(micro_batches))] if (self._closed or self._broken) and micro_batches
                                    else [])
                self._cond.wait(left)

    def has(self, micro_batch: int) -> bool:
        with self._cond:
            return micro_batch in self._results

    def wake(self) -> None:
        """End the wakeable :meth:`take` that waits now, or the next one to wait, with :class:`Woken`."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def take(self, replica: int, micro_batch: int, timeout: float | None, *, wakeable: bool = False) -> tuple:
        """The packet (batch or Failure, calls) of a micro-batch sent earlier. Raises :class:`LinkBroken` if the
        replica's chain breaks first, ``TimeoutError`` after ``timeout`` seconds, and (``wakeable``)
        :class:`Woken` when :meth:`wake` is called before the packet is here."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while micro_batch not in self._results:
                if self._closed:
                    raise LinkBroken("the links were closed")
                if replica in self._broken:
                    raise LinkBroken(self._broken[replica])
                if wakeable and self._woken:
                    self._woken = False
                    raise Woken
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"micro-batch {micro_batch} not back within {timeout:g} s")
                self._cond.wait(left)
            self._wanted.discard(micro_batch)
            batch, meta, _ = self._results.pop(micro_batch)
        if isinstance(batch, ray.ObjectRef):  # a held result, fetched when it arrived
            try:
                batch = ray.get(batch, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - the worker died, or dropped it: resend the micro-batch
                raise LinkBroken(f"fetching micro-batch {micro_batch}'s result: {type(e).__name__}: {e}") from None
        return packet_from_frame(batch, meta)

    def forget(self) -> None:
        """Stop waiting for the micro-batches sent so far (a stream ended early): drop their results on arrival."""
        with self._cond:
            self._wanted.clear()
            self._results.clear()

    def _arrived(self, chain: _Chain, micro_batch: int, batch, meta: dict) -> None:
        if meta.get("held") and micro_batch in self._wanted:
            batch = chain.last.fetch.remote(micro_batch)  # start the fetch now; take() waits for it
        with self._cond:
            if micro_batch in self._wanted:
                self._results[micro_batch] = (batch, meta, chain)
                self._cond.notify_all()

    def _break(self, chain: _Chain, cause: str) -> None:
        with self._cond:
            if self._chains.get(chain.replica) is chain and chain.replica not in self._broken:
                self._broken[chain.replica] = cause
            self._cond.notify_all()

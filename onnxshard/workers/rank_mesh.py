"""The ranks of a tensor-parallel stage linked each to each, so their reduces go worker to worker over sockets
(Unix within a node, TCP between nodes; the same Arrow frames as the pipeline's links) instead of through Ray's
object store and an actor call per step. Between ranks on one node the frames themselves go through shared memory
(``runtime/shared_frames.py``) and the sockets carry only their headers.

Rank 0 sits in the replica's chain of links: it takes each micro-batch from the stage before, hands it to the other
ranks, and sends the stage's result on. Every rank then runs the stage's steps in order. Before a step that reduces,
each rank sends the values to make whole (its partial sums, or its slices) to every rank that runs the step, and
reads theirs: an all-gather of what is needed, each rank summing or concatenating for itself (rank 0 alone runs the
replicated tail, so for it the others only send). Every rank goes through the same exchanges for every micro-batch,
a failed one included (it sends its failure instead of values), so the streams stay in step; a rank that dies
breaks its sockets, which breaks rank 0's link, and the coordinator replaces the stage and links it again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from onnxshard.errors import WorkerError
from onnxshard.runtime import arrow, frames, shared_frames
from onnxshard.workers.packets import Failure, merged_calls, packet_from_frame, packet_to_frame

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 60.0


class RankMesh:
    """This rank's sockets to the other ranks of its stage: listens on creation, :meth:`join` links them."""

    def __init__(self, rank: int, degree: int, folder: str | None, host: str | None, token: bytes,
                 shared: bool = True):
        """``shared=False``: every frame through the sockets, ranks on one node too (for comparison)."""
        self.rank, self.degree, self._token, self._shared = rank, degree, token, shared
        self._server = frames.listen("onnxshard-mesh-", ACCEPT_TIMEOUT_S, folder, host)
        self.path = frames.address(self._server)
        self._peers: dict = {}
        self._senders: dict[int, frames.FrameSender] = {}
        self._shared_in: dict[int, shared_frames.SharedIn] = {}  # frames from ranks on this node
        self._closed = threading.Event()
        self.busy_since: float | None = None  # a rank other than 0: when its micro-batch started

    def join(self, addresses: list[str]) -> None:
        """Connect to the ranks before this one (saying which rank this is) and accept those after it."""
        out = {}
        for r in range(self.rank):
            sock = frames.connect(addresses[r], timeout=ACCEPT_TIMEOUT_S, token=self._token)
            frames.send_frame(sock, 0, None, {"rank": self.rank})
            out[r] = self._share(r, sock, offer_first=True)
            sock.settimeout(None)
            self._peers[r] = sock
        for _ in range(self.rank + 1, self.degree):
            sock = frames.accept(self._server, self._token)
            frames.widen(sock)  # this end sends too: a partial sum fits the buffer, the sender need not wait
            sock.settimeout(ACCEPT_TIMEOUT_S)
            _, _, hello = frames.recv_frame(sock)
            r = int(hello["rank"])
            out[r] = self._share(r, sock, offer_first=False)
            sock.settimeout(None)
            self._peers[r] = sock
        self._senders = {r: frames.FrameSender(s, lambda e: self.close(), name=f"onnxshard-mesh-{r}", shared=out[r])
                         for r, s in self._peers.items()}

    def _share(self, rank: int, sock: socket.socket, offer_first: bool) -> shared_frames.SharedOut | None:
        """With a rank on this node (a Unix socket), swap the shared memory each sends the other frames through:
        the memory for frames to ``rank`` (the one from it is kept for :meth:`receive`)."""
        if sock.family != socket.AF_UNIX or not shared_frames.AVAILABLE or not self._shared:
            return None
        out = shared_frames.SharedOut(sock) if offer_first else None
        self._shared_in[rank] = shared_frames.SharedIn(sock)
        return out or shared_frames.SharedOut(sock)

    def send(self, rank: int, micro_batch: int, batch, meta: dict) -> None:
        self._senders[rank].send(micro_batch, batch, meta)

    def receive(self, rank: int, micro_batch: int | None = None) -> tuple:
        """The next frame from ``rank`` (``micro_batch``: the one it must be about, else the mesh is out of step)."""
        got, batch, meta = frames.recv_frame(self._peers[rank], self._shared_in.get(rank))
        if micro_batch is not None and got != micro_batch:
            raise ConnectionError(f"rank {rank} sent micro-batch {got} while {micro_batch} was due")
        return got, batch, meta

    @property
    def kinds(self) -> dict[int, str]:
        """How this rank reaches each other rank: ``shared`` (memory, the headers over a Unix socket), ``unix`` or
        ``tcp`` (its sockets' families)."""
        return {r: "tcp" if s.family != socket.AF_UNIX else "shared" if r in self._shared_in else "unix"
                for r, s in self._peers.items()}

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        frames.close([self._server, *self._peers.values()], [self.path] if not self.path.startswith("tcp") else [])
        for sender in self._senders.values():
            sender.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class RankSteps:
    """Mixin of the StageWorker: a tensor-parallel stage run over a :class:`RankMesh`."""

    def open_mesh(self, folder: str | None = None, tcp: bool = False, token: bytes = b"") -> str:
        """Close any mesh this rank is in and listen for a new one: a Unix socket inside ``folder`` (``None``: this
        node's temp folder), or with ``tcp`` (the ranks are on several nodes) TCP on this node's address. Only a
        peer that sends ``token`` is let in. Returns the address for the other ranks."""
        import ray

        if self._mesh is not None:
            self._mesh.close()
        host = ray.util.get_node_ip_address() if tcp else None
        self._mesh = RankMesh(self.rank, self.stage.tensor_parallel, folder, host, token)
        return self._mesh.path

    def join_mesh(self, addresses: list[str]) -> None:
        """Link this rank to the others (all ranks are called at once); a rank other than 0 then serves the
        micro-batches rank 0 hands it, in the background."""
        mesh = self._mesh
        mesh.join(addresses)
        if self.rank:
            threading.Thread(target=self._serve_mesh, args=(mesh,), name="onnxshard-mesh", daemon=True).start()

    def _serve_mesh(self, mesh: RankMesh) -> None:
        try:
            while not mesh.closed:
                micro_batch, batch, meta = mesh.receive(0)
                mesh.busy_since = time.monotonic()
                self.run_ranks(mesh, micro_batch, packet_from_frame(batch, meta))
                mesh.busy_since = None
        except OSError:  # rank 0 went away, or the mesh was closed for a new one
            pass
        except Exception:  # a bug: close the mesh, which breaks rank 0's link (the coordinator relinks)
            log.exception("tensor-parallel rank %d failed", self.rank)
        finally:
            mesh.close()

    def run_ranks(self, mesh: RankMesh, micro_batch: int, packet: tuple) -> tuple:
        """This rank's part of one micro-batch: every step it runs, with the exchanges before them. On rank 0,
        hands the stage input to the others first and returns the stage's packet; elsewhere returns this rank's
        last packet."""
        batch, calls = packet
        if self.rank == 0:
            for r in range(1, mesh.degree):
                mesh.send(r, micro_batch, *packet_to_frame((batch, ())))
        for j, step in enumerate(self.stage.steps):
            _, sources = self.shard.wants(j)
            batches = [batch]
            if j and sources:
                mine = batch if isinstance(batch, Failure) else arrow.assemble(arrow.select(batch, sources))
                for r in range(step.ranks):
                    if r != self.rank:
                        mesh.send(r, micro_batch, *packet_to_frame((mine, calls)))
                if self.rank >= step.ranks:
                    break  # the tail runs on rank 0 alone: this rank only sends to it
                received = {r: packet_from_frame(*mesh.receive(r, micro_batch)[1:]) for r in range(mesh.degree)
                            if r != self.rank}
                batches = [batch if r == self.rank else received[r][0] for r in range(mesh.degree)]
                calls = merged_calls([(batch, calls), *received.values()])
            elif self.rank >= step.ranks:
                break
            batch, calls = self._call(micro_batch, calls, batches,
                                      lambda j=j, batches=batches: self._step(j, micro_batch, batches, True), step=j)
        return batch, calls

    def mesh_kinds(self) -> dict[int, str]:
        """How this rank reaches each other rank of its stage (empty when not linked): for tests and operators."""
        return {} if self._mesh is None else self._mesh.kinds

    def mesh_busy_seconds(self) -> float:
        since = None if self._mesh is None else self._mesh.busy_since
        return 0.0 if since is None else time.monotonic() - since

    def check_mesh(self) -> RankMesh:
        """The mesh rank 0 serves its link's micro-batches over (closed or missing: the chain breaks, and the
        coordinator links the stage again)."""
        if self._mesh is None or self._mesh.closed:
            raise WorkerError(f"stage {self.index}'s ranks are not linked", stage=self.index)
        return self._mesh

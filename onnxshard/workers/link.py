"""A stage worker's end of the direct transport: frames in from upstream, frames out to downstream.

The coordinator asks each worker of a replica to listen (a Unix socket in a private folder, so only this user's
processes on this node can connect, when the stage before runs on this node; else TCP on this node's address), then
links them into a chain: coordinator -> stage 0 -> ... -> coordinator. A peer proves it belongs to the pipeline with
the coordinator's token. Two threads serve a link. The worker thread reads each frame off the upstream socket, runs
its micro-batch and writes the result downstream itself when it fits the socket's free send buffer and nothing is
queued before it: one thread from frame in to frame out, with no hand-off to wake another (each costs ~0.1-0.2 ms on
a busy machine). A result too large for that goes to a sender thread, so the next micro-batch computes while it is
still going out. The stage before never waits for this one either: a frame that fits waits in the kernel's buffer,
and a larger one is written by the sender thread of that stage (or of the coordinator) while it goes on. When either
socket breaks, the link closes both, so the break travels along the chain to the coordinator, which then finds the
dead worker and relinks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import pyarrow as pa

from onnxshard.runtime import frames

log = logging.getLogger(__name__)
Handler = Callable[[int, pa.RecordBatch, dict], tuple[pa.RecordBatch | None, dict]]
ACCEPT_TIMEOUT_S = 60.0


class Link:
    """Listens on creation; :meth:`start` connects downstream, accepts upstream and serves in the background."""

    def __init__(self, handle: Handler, folder: str | None = None, host: str | None = None, token: bytes = b""):
        self._handle, self._token = handle, token
        self._server = frames.listen("onnxshard-link-", ACCEPT_TIMEOUT_S, folder, host)
        self.path = frames.address(self._server)
        self._sockets = [self._server]
        self._closed = threading.Event()
        self.kinds: dict[str, str] = {}  # once linked: "unix" or "tcp", for the sockets up and down
        self.busy_since: float | None = None  # when the micro-batch being computed started

    def start(self, downstream: str) -> None:
        threading.Thread(target=self._serve, args=(downstream,), name="onnxshard-link", daemon=True).start()

    def _serve(self, downstream: str) -> None:
        sender = None
        try:
            down = frames.connect(downstream, token=self._token)
            self._sockets.append(down)
            up = frames.accept(self._server, self._token)
            self._sockets.append(up)
            self.kinds = {"up": _kind(up), "down": _kind(down)}
            sender = frames.FrameSender(down, lambda e: self.close(), name="onnxshard-link-sender")
            while not self.closed and (frame := _receive(up)) is not None:
                micro_batch, batch, meta = frame
                self.busy_since = time.monotonic()
                result = self._handle(micro_batch, batch, meta)
                self.busy_since = None
                sender.send(micro_batch, *result)
        except OSError:  # a neighbour went away (or close() was called): the chain is torn down
            pass
        except Exception:  # a bug: break the chain (the coordinator relinks, then gives up after max_retries)
            log.exception("direct link failed")
        finally:
            self.close()
            if sender is not None:
                sender.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        frames.close(self._sockets, [self.path])

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def busy_seconds(self) -> float:
        """How long the micro-batch being computed has taken so far (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since


def _kind(sock: socket.socket) -> str:
    return "unix" if sock.family == socket.AF_UNIX else "tcp"


def _receive(up: socket.socket) -> tuple | None:
    """The next frame from upstream; ``None`` once the link is closed or out of step."""
    try:
        return frames.recv_frame(up)
    except (OSError, ValueError, pa.ArrowException):
        return None

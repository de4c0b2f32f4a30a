"""A stage worker's end of the direct transport: frames in from upstream, frames out to downstream.

The coordinator asks each worker of a replica to listen (a Unix socket in a private folder, so only this user's
processes on this node can connect), then links them into a chain: coordinator -> stage 0 -> ... -> coordinator.
Three threads serve a link, so receiving, computing and sending overlap: a reader takes frames off the upstream
socket as soon as they arrive (the stage before never waits for this one to finish computing), a worker runs each
micro-batch, and a sender writes the results downstream (the next micro-batch computes while a large result is
still going out). When either socket breaks, the link closes both, so the break travels along the chain to the
coordinator, which then finds the dead worker and relinks.
"""

from __future__ import annotations

import logging
import queue
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

    def __init__(self, handle: Handler):
        self._handle = handle
        self._server = frames.listen("onnxshard-link-", ACCEPT_TIMEOUT_S)
        self.path = self._server.getsockname()
        self._sockets = [self._server]
        self._closed = threading.Event()
        self.busy_since: float | None = None  # when the micro-batch being computed started

    def start(self, downstream: str) -> None:
        threading.Thread(target=self._serve, args=(downstream,), name="onnxshard-link", daemon=True).start()

    def _serve(self, downstream: str) -> None:
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        results: queue.SimpleQueue = queue.SimpleQueue()
        try:
            down = frames.connect(downstream)
            self._sockets.append(down)
            up, _ = self._server.accept()
            up.settimeout(None)
            self._sockets.append(up)
            threading.Thread(target=self._read, args=(up, arrived), name="onnxshard-link-reader", daemon=True).start()
            threading.Thread(target=self._send, args=(down, results), name="onnxshard-link-sender",
                             daemon=True).start()
            while (frame := arrived.get()) is not None and not self.closed:
                micro_batch, batch, meta = frame
                self.busy_since = time.monotonic()
                results.put((micro_batch, *self._handle(micro_batch, batch, meta)))
                self.busy_since = None
        except OSError:  # a neighbour went away (or close() was called): the chain is torn down
            self.close()
        except Exception:  # a bug: break the chain (the coordinator relinks, then gives up after max_retries)
            log.exception("direct link failed")
            self.close()
        finally:
            results.put(None)  # the sender finishes what is queued, then closes the link

    def _send(self, down: socket.socket, results: queue.SimpleQueue) -> None:
        try:
            while (item := results.get()) is not None:
                frames.send_frame(down, *item)
        except OSError:
            pass
        finally:
            self.close()

    def _read(self, up: socket.socket, arrived: queue.SimpleQueue) -> None:
        try:
            while True:
                arrived.put(frames.recv_frame(up))
        except (OSError, ValueError, pa.ArrowException):
            pass
        finally:
            arrived.put(None)
            self.close()

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

"""Micro-batches over a socket: the direct transport's wire format (no Ray). A link is a Unix socket between
processes of one node and TCP between nodes; the same frames go over both.

A frame is a fixed header (magic, micro-batch id, payload length) and an Arrow IPC stream holding one record
batch; the schema's metadata carries small JSON values beside the tensors (the calls so far, or the failure that
replaces the data). Sending measures the IPC stream first (no bytes written), then writes the header and streams
the tensors' own buffers into the socket (no serialisation copy); receiving reads into one buffer that the decoded
batch then views. A large activation is copied only by the kernel, into the socket and out of it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)
MAGIC = b"OSF1"
SHARED = b"OSS1"  # a frame whose payload waits in shared memory: the header is followed by the slot's index
TOKEN_TIMEOUT_S = 5.0  # a peer that connects has this long to send the link's token
# A sender's socket buffer: a frame that fits goes into the kernel in one write, without waiting for the reader
# to drain it piece by piece (a 1 MiB frame: 0.31 -> 0.15 ms between two processes, benchmarks/RESULTS.md). Linux
# caps it at net.core.wmem_max (often 208 KiB; raise it for full effect).
SEND_BUFFER = 4 << 20
_HEADER = struct.Struct("<4sqq")
_SLOT = struct.Struct("<q")
if sys.platform == "linux":  # SIOCOUTQ: the bytes a socket holds that its reader has yet to take
    import fcntl
    import termios

    _SIOCOUTQ = termios.TIOCOUTQ
else:
    _SIOCOUTQ = None
_EMPTY = pa.RecordBatch.from_arrays([], schema=pa.schema([]))
# made once: the defaults pyarrow would otherwise build per frame (reading its environment each time)
_WRITE_OPTIONS, _READ_OPTIONS = pa.ipc.IpcWriteOptions(), pa.ipc.IpcReadOptions()
_END_OF_STREAM = 8  # bytes: the continuation marker and a zero length


class LinkClosed(ConnectionError):
    """The other end of a link closed it (cleanly, or by dying)."""


def listen(prefix: str, timeout: float | None = None, folder: str | None = None, host: str | None = None
           ) -> socket.socket:
    """A socket to accept one link on; :func:`address` says where to connect. Without ``host``, a Unix socket in a
    new private folder (mode 0700: only this user's processes can connect) inside ``folder`` (default: the temp
    folder), for peers on this node; with ``host`` (this node's IP), TCP on a free port there, for peers on other
    nodes. Either way :func:`accept` admits only a peer that knows the link's token. ``timeout`` bounds accepting."""
    if host is None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(os.path.join(tempfile.mkdtemp(prefix=prefix, dir=folder), "socket"))
    else:
        server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        server.bind((host, 0))
    server.listen(4)
    server.settimeout(timeout)
    return server


def address(server: socket.socket) -> str:
    """Where peers connect to ``server``: a Unix socket's path, or ``tcp://HOST:PORT``."""
    if server.family == socket.AF_UNIX:
        return server.getsockname()
    host, port = server.getsockname()[:2]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def accept(server: socket.socket, token: bytes) -> socket.socket:
    """The first peer to connect with ``token`` (sent as its first bytes); others are dropped. A TCP link is open
    to the network, so the token, made by the coordinator and given only to the pipeline's own workers, is what
    keeps anyone else from feeding it frames. Raises ``TimeoutError`` once the server's timeout passes."""
    end = None if server.gettimeout() is None else time.monotonic() + server.gettimeout()
    while True:
        if end is not None:
            server.settimeout(max(0.001, end - time.monotonic()))
        peer, _ = server.accept()
        try:
            peer.settimeout(TOKEN_TIMEOUT_S)
            got = bytes(_recv_exact(peer, len(token)))
        except OSError:  # closed early, or too slow to say it
            got = b""
        if hmac.compare_digest(got, token):
            peer.settimeout(None)
            if peer.family != socket.AF_UNIX:
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return peer
        log.warning("a connection to a direct link without its token was refused")
        peer.close()
        if end is not None and time.monotonic() >= end:
            raise TimeoutError("no peer with the link's token connected in time")


def connect(path: str, timeout: float | None = None, token: bytes = b"") -> socket.socket:
    """A socket connected to ``path`` (a Unix socket's path, or ``tcp://HOST:PORT``) to send frames on, having
    sent ``token``; ``timeout`` bounds each send and receive."""
    if path.startswith("tcp://"):
        host, port = path[len("tcp://"):].rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame's pieces go out at once
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
    widen(sock)
    sock.sendall(token)
    return sock


def widen(sock: socket.socket) -> None:
    """Give ``sock`` a send buffer of ``SEND_BUFFER`` bytes, so a frame that size goes out without waiting for
    the reader."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:  # a system that refuses the size: its default buffer still works, only slower
        pass


def close(sockets, paths=()) -> None:
    """Shut down and close ``sockets`` (waking any thread blocked on them) and remove the private folders of the
    socket ``paths`` (see :func:`listen`)."""
    for sock in sockets:
        if sock is None:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
    for path in paths:
        if path and not path.startswith("tcp://"):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def send_frame(sock: socket.socket, micro_batch: int, batch: pa.RecordBatch | None, meta: dict) -> int:
    """Write one frame; ``batch=None`` sends no tensors (a failure). Returns the payload bytes."""
    batch, size = _framed(batch, meta)
    _write_frame(sock, micro_batch, batch, size)
    return size


def _framed(batch: pa.RecordBatch | None, meta: dict) -> tuple[pa.RecordBatch, int]:
    """The batch a frame carries (``meta`` in its schema metadata) and its IPC stream's size (no bytes written)."""
    batch = (_EMPTY if batch is None else batch).replace_schema_metadata(
        {k: json.dumps(v) for k, v in meta.items()})
    return batch, stream_size(batch)


def stream_size(batch: pa.RecordBatch) -> int:
    """The bytes of ``batch``'s IPC stream (schema, batch, end), as :func:`_write_ipc` writes it, counted without
    writing them."""
    return batch.schema.serialize().size + pa.ipc.get_record_batch_size(batch) + _END_OF_STREAM


def _write_frame(sock: socket.socket, micro_batch: int, batch: pa.RecordBatch | None, size: int,
                 slot: int | None = None) -> None:
    if slot is not None:  # the payload is in shared memory already
        sock.sendall(_HEADER.pack(SHARED, micro_batch, size) + _SLOT.pack(slot))
        return
    out = _SocketWriter(sock)
    out.write(_HEADER.pack(MAGIC, micro_batch, size))
    _write_ipc(pa.PythonFile(out, mode="w"), batch)
    out.flush()


class FrameSender:
    """Writes frames to ``sock`` in order, never making its caller wait on the reader: a frame that fits the free
    half of the socket's send buffer while nothing is queued is written at once by the caller's thread (the kernel
    holds it for the reader; no other thread is woken); any other waits in a queue for a sender thread of its own.
    Only Linux tells how much a socket holds unread (SIOCOUTQ); elsewhere every frame goes through the thread.
    ``on_error(exc)`` is called from that thread if a queued write fails; a failed write in the caller's thread
    raises there."""

    def __init__(self, sock: socket.socket, on_error: Callable[[Exception], None], name: str = "onnxshard-sender",
                 shared=None):
        """``shared`` (a ``shared_frames.SharedOut`` to this socket's reader): frames go there when a slot is
        free, and only their headers through the socket."""
        self._sock, self._on_error, self._shared = sock, on_error, shared
        # half the buffer as the kernel set it (Linux doubles what was asked, and counts its overhead against it)
        self._room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 if _SIOCOUTQ is not None else 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._unsent = 0  # frames queued or being written by the thread
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def send(self, micro_batch: int, batch: pa.RecordBatch | None, meta: dict) -> None:
        batch, size = _framed(batch, meta)
        with self._lock:
            slot = None if self._shared is None else self._shared.write(lambda sink: _write_ipc(sink, batch), size)
            item = (micro_batch, batch, size) if slot is None else (micro_batch, None, size, slot)
            if self._unsent == 0 and _HEADER.size + (size if slot is None else _SLOT.size) <= \
                    self._room - _outq(self._sock):
                _write_frame(self._sock, *item)
                return
            self._unsent += 1
        self._queue.put(item)

    def close(self) -> None:
        """Stop once the frames queued so far are written (closing the socket stops it at once)."""
        self._queue.put(None)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                _write_frame(self._sock, *item)
                with self._lock:
                    self._unsent -= 1
        except Exception as e:  # noqa: BLE001 - the reader went away, or the socket was closed under us
            self._on_error(e)


def _outq(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its reader has yet to take, with the kernel's overhead (Linux; else 0)."""
    if _SIOCOUTQ is None:
        return 0
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0" * 4))[0]


def _write_ipc(sink, batch: pa.RecordBatch):
    with pa.ipc.new_stream(sink, batch.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_batch(batch)
    return sink


class _SocketWriter:
    """The file interface Arrow writes an IPC stream to: large buffers go straight into the socket, the small
    pieces between them (header, metadata, padding) are gathered into one send."""

    closed = False
    SMALL = 64 << 10

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._pending = bytearray()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < self.SMALL:
            self._pending += view
        else:
            self.flush()
            self._sock.sendall(view)
        return view.nbytes

    def flush(self) -> None:
        if self._pending:
            self._sock.sendall(self._pending)
            self._pending.clear()

    def close(self) -> None:
        self.flush()


def recv_frame(sock: socket.socket, shared=None) -> tuple[int, pa.RecordBatch, dict]:
    """Read one frame: (micro-batch id, batch, metadata). The batch views one new buffer of its own, which
    nothing else uses (``arrow.decode(..., writable=True)``), whether it came through the socket or through
    ``shared`` (the ``shared_frames.SharedIn`` from this socket's sender). Raises :class:`LinkClosed` at end of
    stream."""
    magic, micro_batch, size = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if magic == SHARED and shared is not None and size >= 0:
        (slot,) = _SLOT.unpack(_recv_exact(sock, _SLOT.size))
        data = shared.read(slot, size)
    elif magic == MAGIC and size >= 0:
        data = _recv_exact(sock, size)
    else:
        raise ConnectionError(f"not an onnxshard frame (header {magic!r}); the link is out of step")
    batch = pa.ipc.open_stream(pa.py_buffer(data), options=_READ_OPTIONS).read_next_batch()
    meta = {k.decode(): json.loads(v) for k, v in (batch.schema.metadata or {}).items()}
    return micro_batch, batch.replace_schema_metadata(None), meta


def _recv_exact(sock: socket.socket, size: int) -> np.ndarray:
    # numpy's allocation, not bytearray's: no zero-fill, and the allocator reuses freed memory (a fresh 51 MB
    # buffer costs ~20 ms of page faults on the 2-core VM, a reused one ~4 ms)
    data = np.empty(size, np.uint8)
    view, got = memoryview(data), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise LinkClosed("the link was closed")
        got += n
    return data

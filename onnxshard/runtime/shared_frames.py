"""Frames through shared memory between two processes of one node: what tensor-parallel ranks send each other.

Over a Unix socket a large frame goes into the kernel and out again in pieces, each piece a system call and, when
the reader is behind, a wake-up. Here the sender writes the frame's Arrow IPC stream into a slot of a memory file
it shares with the reader (a ``memfd``, handed over the Unix socket once when the ranks link: nothing is named in
any folder, so nothing is left behind when a process dies), and the socket carries only a small header naming the
slot. The reader copies the frame out into a buffer of its own (so the batch it gets is the same as a socket
frame's: writable, its own) and frees the slot at once.

Two slots, taken in turn: the sender writes frame n into slot n % 2 only once the reader has copied out frame
n - 2 (a count the reader keeps in the file's first page). A sender never waits: when the slot is still held, or
the frame is larger than a slot, the frame goes through the socket as before. Linux only (``memfd_create`` and
passing descriptors over Unix sockets); elsewhere every frame goes through the socket.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct

import numpy as np
import pyarrow as pa

AVAILABLE = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
SLOTS = 2
SLOT_BYTES = 256 << 20  # a slot's room: address space only; pages are taken as frames are written into them
_HEAD = mmap.PAGESIZE  # the first page: the count of frames the reader has copied out
_COUNT = struct.Struct("<q")
_OFFER = b"M"


class SharedOut:
    """The sending side: the slots this process writes frames into for one reader."""

    def __init__(self, sock: socket.socket):
        """Make the memory file and hand it to the reader at the other end of ``sock`` (a :class:`SharedIn`)."""
        fd = os.memfd_create("onnxshard-frames", os.MFD_CLOEXEC)
        self.slot_bytes = SLOT_BYTES
        try:
            os.ftruncate(fd, _HEAD + SLOTS * self.slot_bytes)
            self._map = mmap.mmap(fd, _HEAD + SLOTS * self.slot_bytes)
            socket.send_fds(sock, [_OFFER], [fd])
        finally:
            os.close(fd)  # the mappings keep the memory
        self._view = memoryview(self._map)
        self._sent = 0

    def write(self, write_ipc, size: int) -> int | None:
        """Write a frame of ``size`` bytes (``write_ipc(sink)`` writes its IPC stream) into the next slot if it is
        free and large enough: the slot's index, else ``None`` (send the frame through the socket)."""
        copied = _COUNT.unpack_from(self._map, 0)[0]
        if size > self.slot_bytes or copied < self._sent - (SLOTS - 1):
            return None
        slot = self._sent % SLOTS
        start = _HEAD + slot * self.slot_bytes
        write_ipc(pa.FixedSizeBufferWriter(pa.py_buffer(self._view[start:start + size])))
        self._sent += 1
        return slot


class SharedIn:
    """The reading side: the sender's slots, and the count of frames copied out of them."""

    def __init__(self, sock: socket.socket):
        """Take the memory file the :class:`SharedOut` at the other end of ``sock`` hands over."""
        data, fds, _, _ = socket.recv_fds(sock, len(_OFFER), 1)
        try:
            if data != _OFFER or len(fds) != 1:
                raise ConnectionError("the peer did not hand over its shared frames")
            self._map = mmap.mmap(fds[0], 0)  # the whole file, as large as the sender made it
            self.slot_bytes = (len(self._map) - _HEAD) // SLOTS
        finally:
            for fd in fds:
                os.close(fd)
        self._copied = 0

    def read(self, slot: int, size: int) -> np.ndarray:
        """The frame in ``slot``, copied into a new buffer (the slot is free again once this returns)."""
        if not 0 <= slot < SLOTS or not 0 <= size <= self.slot_bytes:
            raise ConnectionError(f"a shared frame names slot {slot} of {size} bytes; the link is out of step")
        start = _HEAD + slot * self.slot_bytes
        data = np.empty(size, np.uint8)  # numpy's allocator: freed buffers are reused, no fresh pages each time
        data[:] = np.frombuffer(self._map, np.uint8, size, start)
        self._copied += 1
        _COUNT.pack_into(self._map, 0, self._copied)
        return data

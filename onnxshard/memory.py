"""How much memory a process holds, from /proc (Linux; elsewhere 0). Anonymous RSS (``RssAnon``) is the memory a
process owns: unlike VmRSS it leaves out file-backed pages, such as the Ray object store's shared memory that a
process maps while it reads objects."""

from __future__ import annotations

import threading


def proc_status_bytes(pid: int | str, key: str) -> int:
    """A size line of /proc/PID/status (``RssAnon``, ``VmRSS``, ``VmHWM``...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def private_bytes(pid: int | str = "self") -> int:
    """Anonymous RSS of ``pid`` in bytes; 0 where /proc cannot tell (another OS, a process gone or elsewhere)."""
    try:
        return proc_status_bytes(pid, "RssAnon")
    except (OSError, StopIteration, ValueError):
        return 0


class PeakSampler:
    """The highest :func:`private_bytes` of this process while the ``with`` block runs, sampled every
    ``every_s`` seconds by a daemon thread."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak = every_s, private_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="onnxshard-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, private_bytes())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, private_bytes())

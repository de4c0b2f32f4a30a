"""A sequence being generated: the caller's handle (:class:`Sequence`: stream its tokens, or wait for them) and
the engine's state of it."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

from onnxshard.sampling import SamplingParams


@dataclass
class Sequence:
    """One prompt being generated. Iterate it for tokens as they come, or call :meth:`result`."""

    id: str
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "length", "stop" (EOS or a stop token), "abort" or "error"
    error: Exception | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None  # seconds from submit to the first token
    _queue: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def result(self, timeout: float | None = 600.0) -> list[int]:
        """The generated tokens once finished; raises what failed it, or TimeoutError after ``timeout`` s."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"sequence {self.id} not finished within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    def stream(self, timeout: float | None = 600.0):
        """Yield each token as it is generated; ``timeout``: at most this long between two tokens."""
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"sequence {self.id}: no token within {timeout} s") from None
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    __iter__ = stream

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass
class SequenceState:
    seq: Sequence
    rng: object
    arrived: int
    cached: int = 0  # tokens held in every stage's cache
    busy: bool = False  # a step of it is in flight
    draw: float | None = None  # the uniform number its next token is sampled with (kept if a step is redone)

    @cached_property
    def sample(self) -> dict:
        """Its SamplingParams as every step sends them to the last stage (made once: asdict costs ~30 us a row)."""
        return self.seq.params.to_json()

    @property
    def all_tokens(self) -> list[int]:
        return self.seq.prompt + self.seq.tokens

    @property
    def need(self) -> int:  # cache tokens it may come to hold
        return len(self.seq.prompt) + self.seq.params.max_tokens

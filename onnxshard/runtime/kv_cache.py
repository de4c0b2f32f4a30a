"""One stage's KV cache while generating: per sequence, the past keys and values of the stage's own layers.

The cache never leaves the stage's process. A call runs rows of several sequences at once: each row's past is
padded on the left to the longest past of the call (the coordinator's attention mask is 0 there, and positions are
given explicitly, so padding changes nothing), and what the model returns as ``present`` is kept without that
padding. Sequences are capped in bytes; going over is an error, never an eviction.
"""

from __future__ import annotations

import numpy as np

from onnxshard import dtypes
from onnxshard.errors import InputError, ResourceError
from onnxshard.kv_pairs import KvPair
from onnxshard.plans import TensorSpec
from onnxshard.units import human_bytes


def mask_and_positions(lengths: list[int], new: int) -> dict[str, np.ndarray]:
    """``attention_mask`` [rows, longest + new] and ``position_ids`` [rows, new] for rows with ``lengths`` tokens
    cached and ``new`` tokens each this call: each row's cache padded on the left to the longest, the mask 0 there."""
    longest = max(lengths)
    mask = np.zeros((len(lengths), longest + new), np.int64)
    for i, n in enumerate(lengths):
        mask[i, longest - n:] = 1
    positions = np.array([np.arange(n, n + new) for n in lengths], np.int64).reshape(len(lengths), new)
    return {"attention_mask": mask, "position_ids": positions}


GROUPS_KEPT = 16


class CacheMiss(InputError):
    """A sequence's cache is not here (a new worker after a loss, or a sequence never prefilled here)."""


class KvCache:
    """The cache of ``pairs`` (their past specs in ``specs``): ``shape`` [batch, heads, past, head_dim] with the
    past on ``axis`` 2, the layout optimum and the ONNX Runtime GenAI builder export."""

    AXIS = 2

    def __init__(self, pairs: tuple[KvPair, ...], specs: dict[str, TensorSpec], capacity_bytes: int | None = None):
        self.pairs = pairs
        self.capacity = capacity_bytes
        self._empty: dict[str, np.ndarray] = {}
        for pair in pairs:
            spec = specs[pair.past]
            shape = spec.shape or ()
            if len(shape) != 4 or not all(isinstance(shape[i], int) and shape[i] > 0 for i in (1, 3)):
                raise InputError(f"cache input {pair.past!r} has shape {list(shape)}; onnxshard keeps caches shaped "
                                 "[batch, kv_heads, past, head_dim] with fixed kv_heads and head_dim")
            self._empty[pair.past] = np.zeros((1, shape[1], 0, shape[3]), dtypes.numpy_dtype(spec.dtype))
        self.token_bytes = sum(e.shape[1] * e.shape[3] * e.itemsize for e in self._empty.values())
        self._rows: dict[str, dict[str, np.ndarray]] = {}  # sequence -> past name -> [1, heads, length, head_dim]
        self._lengths: dict[str, int] = {}
        # the last presents of each group of rows, with the lengths they hold: when the same rows come back in the
        # same order, they are the next past as they are, padding included (no gathering)
        self._groups: dict[tuple[str, ...], tuple[tuple[int, ...], dict[str, np.ndarray]]] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._lengths.values()) * self.token_bytes

    def length(self, seq: str) -> int:
        return self._lengths.get(seq, 0)

    def feeds(self, seqs: list[str], lengths: list[int]) -> dict[str, np.ndarray]:
        """The past inputs for a call over ``seqs``, which the coordinator says have ``lengths`` cached (0: new).
        A stage without cached layers (an LM head alone) holds nothing and checks nothing."""
        if not self.pairs:
            return {}
        for seq, want in zip(seqs, lengths):
            have = self._lengths.get(seq)
            if want and have != want:
                raise CacheMiss(f"sequence {seq!r}: this worker holds {have or 0} cached tokens, the call expects "
                                f"{want}; the cache was lost with a worker, prefill the sequence again")
        group = self._groups.get(tuple(seqs))
        if group is not None and group[0] == tuple(lengths):
            return dict(group[1])
        longest = max(lengths)
        out = {}
        for pair in self.pairs:
            empty = self._empty[pair.past]
            batch = np.zeros((len(seqs), empty.shape[1], longest, empty.shape[3]), empty.dtype)
            for row, (seq, n) in enumerate(zip(seqs, lengths)):
                if n:
                    batch[row, :, longest - n:] = self._rows[seq][pair.past][0]
            out[pair.past] = batch
        return out

    def keep(self, seqs: list[str], lengths: list[int], outputs: dict[str, np.ndarray]) -> None:
        """Keep each row's ``present`` without its left padding, replacing the sequence's past."""
        if not self.pairs:
            return
        total = outputs[self.pairs[0].present].shape[self.AXIS]
        longest = max(lengths)
        new = total - longest
        growth = sum(n + new - self._lengths.get(s, 0) for s, n in zip(seqs, lengths))
        if self.capacity is not None and self.used_bytes + growth * self.token_bytes > self.capacity:
            raise ResourceError(f"the KV cache would hold {human_bytes(self.used_bytes + growth * self.token_bytes)}, "
                                f"over kv_cache_memory {human_bytes(self.capacity)}; the coordinator admits fewer "
                                "sequences than this, so this is a bug or a second coordinator")
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            start = longest - n
            self._rows[seq] = {pair.past: outputs[pair.present][row:row + 1, :, start:] for pair in self.pairs}
            self._lengths[seq] = n + new
        self._forget_groups(seqs)
        self._groups[tuple(seqs)] = (tuple(n + new for n in lengths), {p.past: outputs[p.present] for p in self.pairs})
        while len(self._groups) > GROUPS_KEPT:
            self._groups.pop(next(iter(self._groups)))

    def free(self, seqs) -> None:
        for seq in seqs:
            self._rows.pop(seq, None)
            self._lengths.pop(seq, None)
        self._forget_groups(seqs)

    def _forget_groups(self, seqs) -> None:
        """Drop the groups holding any of ``seqs``, whose caches just changed."""
        changed = set(seqs)
        for key in [k for k in self._groups if changed.intersection(k)]:
            del self._groups[key]

    def __len__(self) -> int:
        return len(self._lengths)

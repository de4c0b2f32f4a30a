"""Choosing the next token from a row of logits: greedy, or temperature / top-k / top-p sampling with a seed.
Pure numpy. Each sequence owns its random generator (on the coordinator), which draws one uniform number per
sampled token; whoever holds the logits (the last stage's worker) turns the number into the token. So a sequence's
tokens depend on neither what it was batched with nor which worker sampled them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onnxshard.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded.

    max_tokens: tokens to generate at most. temperature: 0 picks the most likely token (greedy).
    top_k: sample among the k most likely (0: all). top_p: among the fewest whose probabilities reach p.
    seed: makes sampling reproducible (``None``: a fresh seed). stop_token_ids: end when one is generated (kept
    in the output, as EOS is not). eos_token_id: the model's end token (not output); ``ignore_eos`` goes past it.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    eos_token_id: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_json(cls, d: dict) -> SamplingParams:
        return cls(**{**d, "stop_token_ids": tuple(d.get("stop_token_ids", ()))})

    def generator(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def draw(params: SamplingParams, rng: np.random.Generator) -> float:
    """The uniform number the next token is sampled with (none is drawn for greedy decoding)."""
    return 0.0 if params.temperature == 0 else float(rng.random())


def choose(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """The next token for one row of ``logits`` [vocab], ``u`` from :func:`draw`."""
    logits = np.asarray(logits, np.float64).reshape(-1)
    if params.temperature == 0:
        return int(np.argmax(logits))
    z = logits / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[:params.top_k]
    z = z[order]
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        p = p[:keep] / p[:keep].sum()
        order = order[:keep]
    return int(order[min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)])

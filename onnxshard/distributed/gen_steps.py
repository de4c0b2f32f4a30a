"""How generation steps travel through the stage workers: over the direct links (sockets between the workers,
Arrow IPC frames; the step's rows and lengths ride in the frame's metadata) or as Ray actor calls chained by
ObjectRef (any cluster). Both answer the same way: a step's next tokens, :class:`StepFailed` for an error a stage
raised, :class:`StepLost` when a worker or link is gone (the generator then replaces workers and prefills again)."""

from __future__ import annotations

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from onnxshard.distributed.links import DirectLinks, LinkBroken
from onnxshard.distributed.placement import Placement, cause_of
from onnxshard.runtime import arrow
from onnxshard.workers import Failure


class StepFailed(Exception):
    """A stage raised ``kind`` (an onnxshard error's class name) with ``message`` while running a step."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class StepLost(Exception):
    """A step's worker or link is gone."""


class RaySteps:
    name = "ray"

    def __init__(self, placement: Placement):
        self.placement = placement
        self._refs: dict[int, ray.ObjectRef] = {}

    def send(self, step_id: int, batch, step: dict) -> None:
        ref = batch
        for ranks in self.placement.workers[0]:
            ref = ranks[0].generate_step.remote(ref, step)
        self._refs[step_id] = ref

    def ready(self, step_ids: list[int], timeout: float) -> list[int]:
        refs = {self._refs[i]: i for i in step_ids if i in self._refs}
        done, _ = ray.wait(list(refs), num_returns=1, timeout=timeout) if refs else ([], [])
        return [refs[r] for r in done]

    def result(self, step_id: int, timeout: float) -> np.ndarray:
        try:
            return _tokens(ray.get(self._refs.pop(step_id), timeout=timeout))
        except (RayActorError, GetTimeoutError) as e:  # first: a later stage's call fails with its input's
            raise StepLost(f"{type(e).__name__}: {cause_of(e)}") from None  # dead actor, as a RayTaskError too
        except RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            raise StepFailed(type(cause).__name__, cause_of(e)) from None

    def free(self, seqs: list[str]) -> None:
        """Drop these sequences' caches, after the steps sent before (an actor runs one caller's calls in order)."""
        for ranks in self.placement.workers[0]:
            ranks[0].free_cache.remote(seqs)

    def relink(self) -> None:
        """Nothing to relink: the next calls go to the workers the placement holds now."""

    def forget(self) -> None:
        self._refs.clear()

    def close(self) -> None:
        self._refs.clear()


class LinkedSteps:
    name = "direct"

    def __init__(self, placement: Placement, timeout_s: float, window: int):
        self.placement = placement
        self.links = DirectLinks(placement.workers, [placement.nodes(0)], timeout_s, window)
        self._frees = 0

    def send(self, step_id: int, batch, step: dict) -> None:
        try:
            self.links.send_frame(0, step_id, batch, {"gen": step})
        except LinkBroken as e:
            raise StepLost(str(e)) from None

    def ready(self, step_ids: list[int], timeout: float) -> list[int]:
        return self.links.wait_any(step_ids, timeout)

    def free(self, seqs: list[str]) -> None:
        """Drop these sequences' caches: a frame down the chain, so each stage frees after the steps sent before."""
        self._frees -= 1  # ids of their own, below the steps'
        try:
            self.links.send_frame(0, self._frees, None, {"free": seqs}, want=False)
        except LinkBroken:
            pass  # the caches go with the chain's workers, or are freed at the relink

    def result(self, step_id: int, timeout: float) -> np.ndarray:
        try:
            data, _ = self.links.take(0, step_id, timeout)
        except (LinkBroken, TimeoutError) as e:
            raise StepLost(str(e)) from None
        if isinstance(data, Failure):
            raise StepFailed(data.kind, data.message)
        return _tokens(data)

    def relink(self) -> None:
        self.links.connect(0, self.placement.workers[0], self.placement.nodes(0))

    def forget(self) -> None:
        self.links.forget()

    def close(self) -> None:
        self.links.close()


def _tokens(batch) -> np.ndarray:
    return arrow.decode(batch, ["next_token"])["next_token"]

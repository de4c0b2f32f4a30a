"""One served model: a Ray Serve deployment whose every replica owns one pipeline. The replica's placement group
(``placement_group_bundles``: its own bundle, then one per stage worker) holds the pipeline's workers, so Serve's
``num_replicas`` or autoscaling adds whole copies of the split model. Requests from the ingress reach the
pipeline's queue, where dynamic batching joins them."""

from __future__ import annotations

import numpy as np

from onnxshard.serve.kserve import ModelSpec


class ShardedModel:
    """The deployment class (``app.py`` wraps it with ``serve.deployment``), or, serving a single model, held by
    the ingress replica itself."""

    def __init__(self, name: str, path: str, stages: int | None, options: dict):
        from onnxshard.distributed import Pipeline

        self.pipe = Pipeline(path, stages=stages, placement_group="current", name=name, **options)
        self.spec = ModelSpec(name, self.pipe.plan.inputs, self.pipe.plan.outputs)

    async def metadata(self) -> ModelSpec:
        return self.spec

    async def ready(self) -> bool:
        return self.pipe.workers != []

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.pipe.run_async(feeds)

    def totals(self) -> dict[str, int]:
        """Requests, joined batches and micro-batches since start, and the restarts: for tests and operators."""
        return {**self.pipe.totals, "restarts": sum(self.pipe.restarts.values())}

    def worker_pids(self) -> list[list[int]]:
        """Each stage's worker processes (``[stage][rank]``), on their nodes: for operators and tests."""
        return [[w["pid"] for w in ranks] for ranks in self.pipe.worker_info[0]]

    def check_health(self) -> None:
        """Serve's health check: a closed pipeline makes Serve replace this replica."""
        if not self.pipe.workers:
            raise RuntimeError(f"model {self.spec.name!r}: its pipeline is closed")

    def __del__(self):
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()

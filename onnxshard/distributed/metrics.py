"""What a pipeline reports to Ray's metrics (Prometheus, on each node's metrics port), labelled by the pipeline's
name (``PipelineConfig.name``; a served model's name): micro-batches in flight, how long requests waited in the
queue, how many samples each joined batch held, and each stage's compute per micro-batch."""

from __future__ import annotations

import time

from ray.util.metrics import Gauge, Histogram

SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
SAMPLES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
GAUGE_EVERY_S = 0.1  # a busy pipeline's in-flight count changes twice a micro-batch; Prometheus reads it every ~10 s


class PipelineMetrics:
    def __init__(self, name: str):
        self.tags = {"model": name}
        self._in_flight = Gauge("onnxshard_pipeline_in_flight", "micro-batches in the pipeline",
                                tag_keys=("model",))
        self._queue = Histogram("onnxshard_queue_seconds", "time a request waited in the pipeline's queue",
                                boundaries=SECONDS, tag_keys=("model",))
        self._batch = Histogram("onnxshard_batch_size", "samples per batch after dynamic batching",
                                boundaries=SAMPLES, tag_keys=("model",))
        self._stage = Histogram("onnxshard_stage_compute_seconds", "a stage's compute per micro-batch",
                                boundaries=SECONDS, tag_keys=("model", "stage"))
        self._stage_tags: dict[int, dict[str, str]] = {}
        self._gauge_set, self._gauge = -GAUGE_EVERY_S, 0

    def in_flight(self, count: int, now: float | None = None) -> None:
        """Micro-batches in flight: set at most every ``GAUGE_EVERY_S`` while the pipeline is busy (each call
        costs ~10-20 us of the coordinator's thread), and always when it empties or starts, so the gauge never reads
        0 for a busy pipeline nor more for an idle one."""
        now = time.monotonic() if now is None else now
        if count and self._gauge and now - self._gauge_set < GAUGE_EVERY_S:
            return
        self._gauge_set, self._gauge = now, count
        self._in_flight.set(count, tags=self.tags)

    def batch(self, samples: int, waited_s: list[float]) -> None:
        """A batch was formed from requests that waited ``waited_s`` each."""
        self._batch.observe(samples, tags=self.tags)
        for seconds in waited_s:
            self._queue.observe(seconds, tags=self.tags)

    def calls(self, calls) -> None:
        """The stage calls of one finished micro-batch."""
        for call in calls:
            tags = self._stage_tags.get(call.stage)
            if tags is None:
                tags = self._stage_tags[call.stage] = {**self.tags, "stage": str(call.stage)}
            self._stage.observe(call.compute_s, tags=tags)

"""What a pipeline reports to Ray's metrics (Prometheus, on each node's metrics port), labelled by the pipeline's
name (``PipelineConfig.name``; a served model's name): micro-batches in flight, how long requests waited in the
queue, how many samples each joined batch held, and each stage's compute per micro-batch."""

from __future__ import annotations

from ray.util.metrics import Gauge, Histogram

SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
SAMPLES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


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

    def in_flight(self, count: int) -> None:
        self._in_flight.set(count, tags=self.tags)

    def batch(self, samples: int, waited_s: list[float]) -> None:
        """A batch was formed from requests that waited ``waited_s`` each."""
        self._batch.observe(samples, tags=self.tags)
        for seconds in waited_s:
            self._queue.observe(seconds, tags=self.tags)

    def calls(self, calls) -> None:
        """The stage calls of one finished micro-batch."""
        for call in calls:
            self._stage.observe(call.compute_s, tags={**self.tags, "stage": str(call.stage)})

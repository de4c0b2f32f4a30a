"""The errors onnxshard raises. Every message names the thing at fault and says what to do."""


class OnnxShardError(Exception):
    """Base of every error onnxshard raises on purpose."""


class ModelError(OnnxShardError):
    """The ONNX model (or its external weights) cannot be used as given."""


class PlanError(OnnxShardError):
    """No valid plan can be made, or a saved plan is missing, altered or unsafe."""


class ClusterError(PlanError):
    """The Ray cluster cannot be reached, or cannot hold the workers the plan needs (a PlanError: change the
    address, the resources asked for or the plan's shape)."""


class InputError(OnnxShardError):
    """Feeds do not match what the model or stage declares."""


class RowError(InputError):
    """One row of a batch is at fault (``row``: its place in the batch); the others may be good."""

    def __init__(self, message: str, row: int = -1):
        super().__init__(message)
        self.row = row


class OverloadedError(OnnxShardError):
    """The pipeline's request queue is full (or the pipeline is closed): retry later; nothing was run."""


class WorkerError(OnnxShardError):
    """A stage worker failed while running a micro-batch."""

    def __init__(self, message: str, *, stage: int | None = None, micro_batch: int | None = None):
        super().__init__(message)
        self.stage = stage
        self.micro_batch = micro_batch

    def __reduce__(self):
        return (_rebuild_worker_error, (str(self), self.stage, self.micro_batch))


def _rebuild_worker_error(message, stage, micro_batch):
    return WorkerError(message, stage=stage, micro_batch=micro_batch)


class ResourceError(WorkerError):
    """A worker ran out of memory or its device failed: not the data's fault. The coordinator replaces the worker
    and replays the micro-batch (within max_retries), never skips it as bad data."""

    def __reduce__(self):
        return (ResourceError, (str(self),), {"stage": self.stage, "micro_batch": self.micro_batch})

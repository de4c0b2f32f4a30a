"""The ONNX backend API (``onnx.backend.base``) on onnxshard: :meth:`OnnxShardBackend.prepare` plans a model into
up to 3 stages in a temporary folder and returns a :class:`OnnxShardRep` whose ``run`` runs the stages one after
another in this process (or, with ``pipeline=True``, through a :class:`~onnxshard.Pipeline` on Ray). It lets the
ONNX conformance suite (``onnx.backend.test``) check every cut the partitioner makes::

    import onnx.backend.test
    from onnxshard.backend import OnnxShardBackend
    globals().update(onnx.backend.test.BackendTest(OnnxShardBackend, __name__).test_cases)
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.backend.base
import onnxruntime as ort

from onnxshard import partitioner
from onnxshard.errors import InputError
from onnxshard.runtime import RuntimeConfig, tools

MAX_STAGES = 3


class OnnxShardRep(onnx.backend.base.BackendRep):
    """A prepared model: its plan, and the stage sessions (or the pipeline) that run it."""

    def __init__(self, plan, inputs: list[str], outputs: list[str], folder: tempfile.TemporaryDirectory,
                 runtime: RuntimeConfig, *, pipeline: bool = False, **options):
        self.plan, self.inputs, self.outputs = plan, inputs, outputs
        self.pipe = None
        if pipeline:
            from onnxshard.distributed import Pipeline

            self.pipe = Pipeline(plan.root, runtime=runtime, **options)
        elif options:
            raise InputError(f"options {sorted(options)} are a Pipeline's: they apply with pipeline=True")
        else:
            self.sessions = tools.stage_sessions(plan, runtime)
        self._finalizer = weakref.finalize(self, _close, self.pipe, folder)

    def run(self, inputs: Any, **kwargs) -> tuple[np.ndarray, ...]:
        """The model's outputs, in its order, for ``inputs``: a list in the order of the graph's inputs, a dict by
        name, or one array for a model with one input."""
        feeds = self._feeds(inputs)
        if self.pipe is not None:
            got = self.pipe.run(feeds)
        else:
            got = tools.run_stages(self.plan, feeds, self.sessions)
        return tuple(got[name] for name in self.outputs)

    def _feeds(self, inputs: Any) -> dict[str, Any]:
        """By name; a numpy scalar as a 0-d array (as ONNX Runtime's backend takes it)."""
        if isinstance(inputs, (np.ndarray, np.generic)):
            inputs = [inputs]
        if not isinstance(inputs, dict):
            if len(inputs) > len(self.inputs):
                raise InputError(f"{len(inputs)} inputs given; the model takes {len(self.inputs)}: {self.inputs}")
            inputs = dict(zip(self.inputs, inputs))
        return {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in inputs.items()}

    def close(self) -> None:
        """Stop the pipeline (if any) and remove the plan's folder."""
        self._finalizer()


def _close(pipe, folder: tempfile.TemporaryDirectory) -> None:
    if pipe is not None:
        pipe.close()
    folder.cleanup()


class OnnxShardBackend(onnx.backend.base.Backend):
    """``prepare(model, device="CPU", stages=None, pipeline=False, **pipeline_options)``: ``model`` is an
    ``onnx.ModelProto``, its bytes, or a path (planned where it lies); ``stages`` defaults to as many as the model
    has places to cut, up to 3; ``device`` ``"CPU"`` or ``"CUDA"`` picks the execution provider (or give
    ``runtime=RuntimeConfig(...)``); ``pipeline_options`` go to the :class:`~onnxshard.Pipeline`."""

    @classmethod
    def prepare(cls, model, device: str = "CPU", *, stages: int | None = None, pipeline: bool = False,
                **options) -> OnnxShardRep:
        if not cls.supports_device(device):
            raise InputError(f"device {device!r}: this onnxruntime has no provider for it")
        folder = tempfile.TemporaryDirectory(prefix="onnxshard-backend-")
        try:
            if isinstance(model, (str, os.PathLike)):  # planned where it lies: its weights are not read
                path = Path(model)
                onnx.checker.check_model(os.fspath(path))
            else:
                if isinstance(model, bytes):
                    model = onnx.load_from_string(model)
                onnx.checker.check_model(model)
                path = Path(folder.name) / "model.onnx"
                onnx.save(model, path)
            analysis = partitioner.analyse_model(path, type_oracle=tools.probe_types)
            count = stages if stages is not None else min(MAX_STAGES, partitioner.most_stages(analysis))
            plan = partitioner.partition(analysis, Path(folder.name) / "plan", stages=count)
            inputs, outputs = list(analysis.graph.inputs), list(analysis.graph.outputs)
            runtime = options.pop("runtime", None) or RuntimeConfig(
                provider="cuda" if device.split(":")[0].upper() in ("CUDA", "GPU") else "cpu")
            return OnnxShardRep(plan, inputs, outputs, folder, runtime, pipeline=pipeline, **options)
        except BaseException:
            folder.cleanup()
            raise

    @classmethod
    def supports_device(cls, device: str) -> bool:
        kind = device.split(":")[0].upper()
        if kind == "CPU":
            return True
        return kind in ("CUDA", "GPU") and "CUDAExecutionProvider" in ort.get_available_providers()


prepare = OnnxShardBackend.prepare
run_model = OnnxShardBackend.run_model
supports_device = OnnxShardBackend.supports_device

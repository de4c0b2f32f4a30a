"""One served model: a Ray Serve deployment whose every replica owns one pipeline. The replica's placement group
(``placement_group_bundles``: its own bundle, then one per stage worker) holds the pipeline's workers, so Serve's
``num_replicas`` or autoscaling adds whole copies of the split model. Requests from the ingress reach the
pipeline's queue, where dynamic batching joins them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from onnxshard.errors import InputError
from onnxshard.plans import Plan, is_plan_dir
from onnxshard.serve.kserve import ModelSpec


class ShardedModel:
    """The deployment class (``app.py`` wraps it with ``serve.deployment``), or, serving a single model, held by
    the ingress replica itself. A decoder plan (one with KV-cache pairs) gets a :class:`Generator` instead of a
    pipeline, and text through the tokenizer beside the model (``tokenizer.json``), when there is one."""

    def __init__(self, name: str, path: str, stages: int | None, options: dict, generation: dict | None = None):
        from onnxshard.distributed import Pipeline

        plan = _plan(path, stages)
        self.pipe = self.generator = self.codec = None
        if plan.kv_cache:
            from onnxshard.distributed.generator import Generator
            from onnxshard.text import TextCodec

            self.codec = TextCodec.find(plan.root, Path(plan.model).parent)
            eos = self.codec.eos_token_id if self.codec is not None else None
            self.generator = Generator(plan, placement_group="current", name=name, eos_token_id=eos,
                                       **(generation or {}), **options)
        else:
            self.pipe = Pipeline(plan, placement_group="current", name=name, **options)
        self.spec = ModelSpec(name, plan.inputs, plan.outputs)

    async def metadata(self) -> ModelSpec:
        return self.spec

    async def ready(self) -> bool:
        return self._open()

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.pipe is None:
            raise InputError(f"model {self.spec.name!r} is a decoder served for generation: use /v1/completions or "
                             "/v1/chat/completions")
        return await self.pipe.run_async(feeds)

    async def decoder_info(self) -> dict:
        codec = self.codec
        return {"decoder": self.generator is not None, "text": codec is not None,
                "chat": codec is not None and codec.chat_template is not None,
                "max_model_len": self.generator.max_model_len if self.generator is not None else None}

    async def generate(self, request):
        """Events of one generation (``request``: a checked ``openai.GenerateRequest``): first the prompt's
        size, then each token with its new text, last the finish reason. Closing the stream (a client that went
        away) aborts the sequence and frees its caches."""
        from onnxshard.sampling import SamplingParams
        from onnxshard.text import TextStream

        codec, gen = self.codec, self.generator
        if request.messages is not None:
            ids = codec.encode(codec.chat_prompt(request.messages), special=False)
        elif isinstance(request.prompt, str):
            ids = codec.encode(request.prompt)
        else:
            ids = list(request.prompt)
        params = SamplingParams(**request.sampling, eos_token_id=codec.eos_token_id if codec is not None else None)
        seq = gen.submit(ids, params)
        text = TextStream(codec, request.stop) if codec is not None else None
        try:
            yield {"prompt_tokens": len(ids)}
            tokens = seq.stream(timeout=gen.step_timeout_s)
            while (token := await asyncio.to_thread(next, tokens, None)) is not None:
                yield {"text": text.push(token) if text is not None else "", "token_ids": [token]}
                if text is not None and text.stopped:
                    break
            stopped = text is not None and text.stopped
            yield {"text": text.flush() if text is not None else "", "token_ids": [],
                   "finish_reason": "stop" if stopped else seq.finish_reason}
        finally:
            if not seq.done:
                gen.abort(seq)

    def generation_stats(self) -> dict[str, int]:
        """Waiting, running and aborted sequences, steps and recoveries of a decoder: for tests and operators."""
        return self.generator.stats

    def totals(self) -> dict[str, int]:
        """Requests, joined batches and micro-batches since start, and the restarts: for tests and operators."""
        return {**self.pipe.totals, "restarts": sum(self.pipe.restarts.values())}

    def worker_pids(self) -> list[list[int]]:
        """Each stage's worker processes (``[stage][rank]``), on their nodes: for operators and tests."""
        placement = self.pipe.placement if self.pipe is not None else self.generator.placement
        return [[w["pid"] for w in ranks] for ranks in placement.info[0]]

    def check_health(self) -> None:
        """Serve's health check: a closed pipeline makes Serve replace this replica."""
        if not self._open():
            raise RuntimeError(f"model {self.spec.name!r}: its pipeline is closed")

    def _open(self) -> bool:
        return self.pipe.workers != [] if self.pipe is not None else self.generator.placement is not None

    def __del__(self):
        for engine in (getattr(self, "pipe", None), getattr(self, "generator", None)):
            if engine is not None:
                engine.close()


def _plan(path: str, stages: int | None) -> Plan:
    """The plan at ``path``, or a bare ONNX model planned into ``stages`` (default 2) in a temporary folder."""
    if is_plan_dir(path):
        return Plan.load(path)
    import onnxshard

    return onnxshard.plan(path, stages=2 if stages is None else stages)

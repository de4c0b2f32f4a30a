"""The Ray Serve application: one ingress deployment speaking the protocol, and one deployment per model whose
replicas each own a pipeline in their own placement group. ``build_app`` is an application builder, so Serve's
own tooling works: ``serve run onnxshard.serve:build_app plan_dir=plan/`` and ``serve build`` / ``serve deploy``
with a config file (``cluster/serve_config.yaml``)."""

from __future__ import annotations

import hashlib
import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from onnxshard.distributed.config import PipelineConfig, check_config
from onnxshard.distributed.placement import worker_bundle
from onnxshard.errors import PlanError
from onnxshard.serve.repository import Source, discover
from onnxshard.units import parse_bytes

# Serve's gRPC proxy registers this servicer (grpc_options.grpc_servicer_functions); see grpc_stubs.py
GRPC_SERVICER = "onnxshard.serve.grpc_stubs.add_GRPCInferenceServiceServicer_to_server"


class ServeArgs(BaseModel):
    """What ``build_app`` takes (``serve run onnxshard.serve:build_app key=value ...``, or ``args:`` in a Serve
    config file). Give one of ``plan_dir``, ``model`` or ``repository``."""

    model_config = ConfigDict(extra="forbid")

    plan_dir: str | None = None
    model: str | None = None
    repository: str | None = None
    stages: int | None = Field(None, ge=1, description="stages a bare ONNX model is split into (default 2)")
    replicas: int = Field(1, ge=1, description="Serve replicas per model, each a whole pipeline")
    max_batch_size: int | None = Field(32, ge=1, description="dynamic batching: samples joined per batch")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="how long an idle pipeline waits for more")
    max_queue_size: int = Field(256, ge=1, description="requests waiting per replica; past it: 503")
    micro_batch_size: int | str | None = "auto"
    cpus_per_stage: float = Field(1.0, gt=0)
    gpus_per_stage: float = Field(0.0, ge=0)
    replica_cpus: float = Field(0.0, ge=0, description="CPUs reserved for each replica owning a pipeline (its "
                                "coordinator thread); 0 puts it in its first stage worker's bundle")
    transport: str = "auto"
    call_timeout_s: float | None = Field(None, gt=0)
    run_timeout_s: float | None = Field(None, gt=0)
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    max_body_size: int = Field(64 << 20, ge=1, description="largest request body in bytes, or '64MiB' (413 past it)")
    kv_cache_memory: int | None = Field(None, ge=1, description="decoders: KV cache bytes per stage worker, or "
                                        "'2GB' (sequences that would not fit wait)")
    max_model_len: int | None = Field(None, ge=2, description="decoders: the longest sequence, prompt and "
                                      "generated (a longer prompt gets 400)")

    @field_validator("max_body_size", "kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_bytes(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("plan_dir", "model", "repository") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of plan_dir, model or repository (got {given or 'none'})")
        return self

    @property
    def source(self) -> str:
        return self.plan_dir or self.model or self.repository

    def pipeline_options(self) -> dict:
        """The pipeline's options in each model replica, checked here (before anything is deployed)."""
        options = dict(max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms,
                       max_queue_size=self.max_queue_size, micro_batch_size=self.micro_batch_size,
                       cpus_per_stage=self.cpus_per_stage, gpus_per_stage=self.gpus_per_stage,
                       transport=self.transport, call_timeout_s=self.call_timeout_s,
                       run_timeout_s=self.run_timeout_s)
        check_config(PipelineConfig(**options))
        return options

    def generation_options(self) -> dict:
        """A decoder's generator options (other models ignore them)."""
        return dict(kv_cache_memory=self.kv_cache_memory, max_model_len=self.max_model_len)


def api_key_digest(env: str | None) -> str | None:
    """The SHA-256 of the API key in ``$env`` (the key itself never enters Serve's config or the dashboard)."""
    if env is None:
        return None
    key = os.environ.get(env, "")
    if len(key) < 8:
        raise PlanError(f"--api-key-env {env}: the environment variable is {'unset' if not key else 'too short'}; "
                        "set it to a key of at least 8 characters")
    return hashlib.sha256(key.encode()).hexdigest()


def _model_args(source: Source, args: ServeArgs) -> ServeArgs:
    """The server's settings with the model's own (its serve.json) over them."""
    if not source.overrides:
        return args
    try:
        return ServeArgs.model_validate({**args.model_dump(), **source.overrides})
    except ValueError as e:
        raise PlanError(f"model {source.name!r}: its serve.json has bad settings: {e}") from None


def _replica_options(source: Source, args: ServeArgs) -> dict:
    """Serve options of a replica that owns one pipeline of ``source``: its own bundle, then its workers'."""
    own = [{"CPU": args.replica_cpus}] if args.replica_cpus else []  # else it shares the first worker's bundle
    bundles = own + [worker_bundle(PipelineConfig(**args.pipeline_options()))] * source.workers
    return dict(num_replicas=args.replicas, ray_actor_options={"num_cpus": args.replica_cpus},
                placement_group_bundles=bundles, placement_group_strategy="PACK", health_check_period_s=10,
                graceful_shutdown_timeout_s=5)


def model_deployment(source: Source, args: ServeArgs):
    """The bound deployment of one model of a repository."""
    from ray import serve

    from onnxshard.serve.model import ShardedModel

    args = _model_args(source, args)
    deployment = serve.deployment(ShardedModel, name=f"model-{source.name}")
    return deployment.options(**_replica_options(source, args), max_ongoing_requests=2 * args.max_queue_size,
                              max_queued_requests=args.max_queue_size).bind(
        source.name, str(source.path), args.stages, args.pipeline_options(), args.generation_options())


def cpus_needed(sources: list[Source], args: ServeArgs) -> float:
    """Logical CPUs the app reserves: each model replica's own and its workers'."""
    return sum(a.replicas * (a.replica_cpus + s.workers * a.cpus_per_stage)
               for s in sources for a in [_model_args(s, args)])


def build_app(args: ServeArgs | dict, sources: list[Source] | None = None):
    """The Serve application for ``args`` (a dict from ``serve run``/a config file, or :class:`ServeArgs`).

    ``sources``: the models of ``args.source`` when already discovered (each plan is loaded and checked once).
    One model: the ingress replicas own its pipelines (one Serve hop per request). Several: one deployment per
    model, each scaled on its own, behind one ingress (a hop more)."""
    from ray import serve

    from onnxshard.serve.ingress import KServeApp

    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    if sources is None:  # `serve run` / a config file; `onnxshard serve` found them already
        sources = discover(args.source, stages=args.stages)
    ingress = serve.deployment(KServeApp, name="kserve-ingress")
    settings = dict(api_key_sha256=api_key_digest(args.api_key_env), max_body_bytes=args.max_body_size)
    if len(sources) == 1:
        (source,) = sources
        model_args = _model_args(source, args)
        return ingress.options(**_replica_options(source, model_args),
                               max_ongoing_requests=2 * model_args.max_queue_size).bind(
            local=(source.name, str(source.path), args.stages, model_args.pipeline_options(),
                   model_args.generation_options()), **settings)
    models = {s.name: model_deployment(s, args) for s in sources}
    return ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * args.max_queue_size).bind(
        models, **settings)

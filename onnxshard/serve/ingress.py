"""The ingress deployment: KServe v2 / Open Inference Protocol routes over HTTP (a FastAPI app behind Ray Serve's
HTTP proxy) and gRPC (``inference.GRPCInferenceService`` methods behind Serve's gRPC proxy), for the models
listed at start-up. It checks requests (``kserve.py``), then calls the model's deployment.

Errors are ``{"error": "..."}`` with the status the protocol gives (tritonclient reads that key; FastAPI's
``{"detail"}`` would break it): 400 for a bad request, 401 without the API key, 404 for an unknown model or
route, 413 past the body limit, 503 when the model's queue is full, 504 past the request deadline."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

from fastapi import Request
from fastapi.responses import Response
from ray import serve

from onnxshard.errors import InputError, OnnxShardError, OverloadedError, WorkerError
from onnxshard.serve import kserve
from onnxshard.serve.grpc_stubs import pb
from onnxshard.serve.http import app
from onnxshard.serve.openai import OpenAIRoutes
from onnxshard.serve.tensors import ProtocolError

log = logging.getLogger("ray.serve")
SERVER = "onnxshard"
HEALTH_TIMEOUT_S = 10.0
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
              500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

def status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and message for an error raised while running a request."""
    if isinstance(error, ProtocolError):
        return error.status, str(error)
    if isinstance(error, InputError):
        return 400, _first_line(error)
    if isinstance(error, OverloadedError) or type(error).__name__ == "BackPressureError":
        return 503, f"overloaded: {_first_line(error)}"
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        return 504, "the request ran past its deadline"
    if isinstance(error, WorkerError):
        return 500, _first_line(error)
    return 500, f"internal error: {type(error).__name__}"


INLINE_BYTES = 256 << 10  # tensors up to this size are parsed and encoded on the event loop (a thread hop costs more)


async def _off_loop(size: int, fn, *args):
    """``fn(*args)``: on the event loop when ``size`` is small, else in a thread so the loop keeps serving."""
    return fn(*args) if size <= INLINE_BYTES else await asyncio.to_thread(fn, *args)


def _nbytes(results: dict) -> int:
    return sum(getattr(v, "nbytes", 0) for v in results.values())


class RemoteModel:
    """A model deployment seen through its Serve handle, with the interface of a local ``ShardedModel``."""

    def __init__(self, handle):
        self.handle = handle

    async def metadata(self) -> kserve.ModelSpec:
        return await self.handle.metadata.remote()

    async def ready(self) -> bool:
        return await self.handle.ready.remote()

    async def infer(self, feeds: dict) -> dict:
        return await self.handle.infer.remote(feeds)

    async def decoder_info(self) -> dict:
        return await self.handle.decoder_info.remote()

    def generate(self, request):
        """The model's generation events, streamed from its replica."""
        return self.handle.options(stream=True).generate.remote(request)

    def check_health(self) -> None:
        """Serve checks the model deployment's own replicas."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxshard")
    except PackageNotFoundError:
        return "unknown"


def _first_line(error: BaseException) -> str:
    from onnxshard.distributed.placement import cause_of

    return cause_of(error) if isinstance(error, OnnxShardError) else str(error).strip().splitlines()[-1]


class KServeIngress(OpenAIRoutes):
    """The protocol's routes for ``models``: name -> the model deployment's handle, each replica of which owns a
    pipeline. With ``local`` (one model: ``(name, path, stages, pipeline options, generation options)``) this replica owns that
    model's pipeline itself, a Serve hop less per request. A decoder model (a plan with a KV cache) answers the
    OpenAI routes (``openai.py``) instead of inference. ``api_key_sha256``: the SHA-256 of the API key every
    route but the server's health checks requires (``None``: no key)."""

    def __init__(self, models: dict | None = None, api_key_sha256: str | None = None, max_body_bytes: int = 64 << 20,
                 local: tuple | None = None):
        if local is not None:
            from onnxshard.serve.model import ShardedModel

            self.models = {local[0]: ShardedModel(*local)}
        else:
            self.models = {name: RemoteModel(handle) for name, handle in (models or {}).items()}
        self.key = api_key_sha256
        self.max_body_bytes = max_body_bytes
        self.specs: dict[str, kserve.ModelSpec] = {}
        self.decoders: dict[str, dict] = {}
        self.started = int(time.time())

    def check_health(self) -> None:
        for model in self.models.values():
            model.check_health()

    # -- shared by both protocols -------------------------------------------------------------------------
    def _authorize(self, header: str | None) -> None:
        if self.key is None:
            return
        scheme, _, token = (header or "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.key):
            raise ProtocolError("missing or wrong API key: send 'Authorization: Bearer <key>'", 401)

    def _handle(self, model: str, version: str | None = None):
        if model not in self.models:
            raise ProtocolError(f"unknown model {model!r}; served: {sorted(self.models)}", 404)
        kserve.check_version(version)
        return self.models[model]

    async def _spec(self, model: str) -> kserve.ModelSpec:
        if model not in self.specs:
            self.specs[model] = await self._call(model, self._handle(model).metadata())
        return self.specs[model]

    async def _decoder_info(self, model: str) -> dict:
        """Whether ``model`` generates (a decoder plan) and takes text and chat (its tokenizer files)."""
        if model not in self.decoders:
            self.decoders[model] = await self._call(model, self._handle(model).decoder_info())
        return self.decoders[model]

    async def _model_ready(self, model: str) -> bool:
        try:
            return await asyncio.wait_for(self._handle(model).ready(), HEALTH_TIMEOUT_S)
        except ProtocolError:
            raise
        except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
            return False

    async def _infer(self, model: str, request: kserve.InferRequest) -> dict:
        return await self._call(model, self._handle(model).infer(request.feeds))

    async def _call(self, model: str, response):
        """Await a call to the model's deployment; its errors become the protocol's (Serve's back-pressure: 503)."""
        try:
            return await response
        except Exception as e:  # noqa: BLE001 - mapped to a status; the server stays up
            status, message = status_of(e)
            if status >= 500:
                log.warning("model %s: %s", model, message)
            raise ProtocolError(message, status) from None

    def server_metadata(self) -> dict:
        return {"name": SERVER, "version": _version(), "extensions": kserve.EXTENSIONS}

    # -- HTTP -------------------------------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live(self):
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready(self):
        answers = await asyncio.gather(*(self._model_ready(m) for m in self.models))
        return Response(status_code=200 if all(answers) else 503)

    @app.get("/v2")
    async def metadata(self, request: Request):
        self._authorize(request.headers.get("authorization"))
        return self.server_metadata()

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(self, model: str, request: Request, version: str | None = None):
        self._authorize(request.headers.get("authorization"))
        self._handle(model, version)
        return Response(status_code=200 if await self._model_ready(model) else 503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(self, model: str, request: Request, version: str | None = None):
        self._authorize(request.headers.get("authorization"))
        self._handle(model, version)
        return (await self._spec(model)).metadata()

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(self, model: str, request: Request, version: str | None = None):
        self._authorize(request.headers.get("authorization"))
        self._handle(model, version)
        body = await self._read_body(request)
        spec = await self._spec(model)
        parsed = await _off_loop(len(body), kserve.parse_http, spec, body, request.headers.get(kserve.HEADER_LENGTH))
        results = await self._infer(model, parsed)
        content, header_length = await _off_loop(_nbytes(results), kserve.http_response, spec, parsed, results)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (declared or streamed)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ProtocolError(f"the request body ({declared} bytes) is over the limit of {limit} bytes", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"the request body is over the limit of {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- gRPC (inference.GRPCInferenceService; Serve's gRPC proxy calls these by method name) ----------------
    async def ServerLive(self, request, grpc_context=None):  # noqa: N802 - the protocol's method names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, grpc_context=None):  # noqa: N802
        answers = await asyncio.gather(*(self._model_ready(m) for m in self.models))
        return pb.ServerReadyResponse(ready=all(answers))

    async def ServerMetadata(self, request, grpc_context=None):  # noqa: N802
        return await self._grpc(grpc_context, pb.ServerMetadataResponse, lambda: pb.ServerMetadataResponse(
            **self.server_metadata()))

    async def ModelReady(self, request, grpc_context=None):  # noqa: N802
        async def answer():
            self._handle(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=await self._model_ready(request.name))

        return await self._grpc(grpc_context, pb.ModelReadyResponse, answer)

    async def ModelMetadata(self, request, grpc_context=None):  # noqa: N802
        async def answer():
            self._handle(request.name, request.version or None)
            meta = (await self._spec(request.name)).metadata()
            response = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                                platform=meta["platform"])
            for kind in ("inputs", "outputs"):
                for t in meta[kind]:
                    getattr(response, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            return response

        return await self._grpc(grpc_context, pb.ModelMetadataResponse, answer)

    async def ModelInfer(self, request, grpc_context=None):  # noqa: N802
        async def answer():
            self._handle(request.model_name, request.model_version or None)
            if request.ByteSize() > self.max_body_bytes:
                raise ProtocolError(f"the request ({request.ByteSize()} bytes) is over the limit of "
                                    f"{self.max_body_bytes} bytes", 413)
            spec = await self._spec(request.model_name)
            parsed = await _off_loop(request.ByteSize(), kserve.parse_grpc, spec, request)
            results = await self._infer(request.model_name, parsed)
            response = pb.ModelInferResponse()
            await _off_loop(_nbytes(results), kserve.grpc_response, spec, parsed, results, response)
            return response

        return await self._grpc(grpc_context, pb.ModelInferResponse, answer)

    async def _grpc(self, grpc_context, empty, answer):
        """Run ``answer`` after the API key check; a refusal sets the gRPC status and details."""
        import grpc

        try:
            metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
            self._authorize(metadata.get("authorization"))
            result = answer()
            return await result if asyncio.iscoroutine(result) else result
        except ProtocolError as e:
            if grpc_context is None:
                raise
            grpc_context.set_code(getattr(grpc.StatusCode, GRPC_CODES.get(e.status, "UNKNOWN")))
            grpc_context.set_details(str(e))
            return empty()


# the class Serve deploys: the FastAPI routes above bound to it (done once, at import)
KServeApp = serve.ingress(app)(KServeIngress)

"""The OpenAI-compatible routes for decoder models, on the same FastAPI app as the KServe routes:
``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed over server-sent events
(``data: {...}`` chunks ending in ``data: [DONE]``) when ``"stream": true``.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI gives: 400 for a bad request
(``param`` names the field), 401 without the API key, 404 for an unknown model, 413 past the body limit, 503 when
the model is overloaded."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from onnxshard.serve.http import app
from onnxshard.serve.tensors import ProtocolError

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 503: "server_error", 504: "server_error", 500: "server_error"}
UNSUPPORTED = ("logprobs", "echo", "best_of", "suffix", "tools", "functions", "response_format", "logit_bias")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": ERROR_TYPES.get(self.status, "server_error"),
                                       "param": self.param, "code": self.code}}, status_code=self.status)


@app.exception_handler(OpenAIError)
async def _openai_error(_, exc: OpenAIError):
    return exc.response()


@dataclass
class GenerateRequest:
    """A completion or chat request, checked: what the model deployment's ``generate`` takes."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    sampling: dict = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body: bytes, *, chat: bool) -> GenerateRequest:
    """The request in ``body``, or an :class:`OpenAIError` naming the field that is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenAIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("'model' is required (a served model's name; GET /v1/models lists them)", param="model")
    for name in UNSUPPORTED:
        if data.get(name) not in (None, False, [], {}):
            raise OpenAIError(f"'{name}' is not supported by onnxshard", param=name, code="unsupported_parameter")
    n = data.get("n", 1)
    if n != 1:
        raise OpenAIError("'n' must be 1 (one choice per request)", param="n")
    req = GenerateRequest(model=model, stream=_flag(data, "stream"))
    options = data.get("stream_options") or {}
    req.include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if chat:
        req.messages = _messages(data.get("messages"))
    else:
        req.prompt = _prompt(data.get("prompt"))
    tokens_key = "max_completion_tokens" if chat and "max_completion_tokens" in data else "max_tokens"
    req.sampling = {"max_tokens": _number(data, tokens_key, 16, int, low=1),
                    "temperature": _number(data, "temperature", 1.0, float, low=0.0, high=2.0),
                    "top_p": _number(data, "top_p", 1.0, float, low=0.0, high=1.0, open_low=True),
                    "top_k": _number(data, "top_k", 0, int, low=0),
                    "seed": _number(data, "seed", None, int), "ignore_eos": _flag(data, "ignore_eos")}
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise OpenAIError("'stop' must be a string or a list of up to 4 strings", param="stop")
    req.stop = stop
    return req


def _flag(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise OpenAIError(f"'{name}' must be true or false", param=name)
    return value


def _number(data: dict, name: str, default, kind, *, low=None, high=None, open_low=False):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise OpenAIError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=name)
    if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
        bounds = f"{'over' if open_low else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")
        raise OpenAIError(f"'{name}' must be {bounds}, got {value!r}", param=name)
    return kind(value)


def _prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return prompt
    raise OpenAIError("'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                      param="prompt")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OpenAIError("each message needs a 'role' and a string 'content'", param="messages")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def as_openai(error: BaseException) -> OpenAIError:
    """Any error raised answering a request, in OpenAI's shape (the KServe side's statuses)."""
    from onnxshard.serve.ingress import status_of

    if isinstance(error, OpenAIError):
        return error
    status, message = status_of(error)
    param = code = None
    if status == 400 and "prompt" in message:
        param, code = "prompt", "context_length_exceeded" if "at most" in message else None
    if status == 400 and "max_tokens" in message:
        param = "max_tokens"
    if status == 404:
        param, code = "model", "model_not_found"
    if status == 401:
        code = "invalid_api_key"
    return OpenAIError(message, status, param, code)


class OpenAIRoutes:
    """The routes, mixed into the ingress (which provides ``_authorize``, ``_read_body``, ``_handle`` and
    ``_decoder_info``)."""

    async def _open(self, request: Request, chat: bool):
        """Check the key and the body, start generating; the request and its first event (the prompt's size)."""
        try:
            self._authorize(request.headers.get("authorization"))
            req = parse_request(await self._read_body(request), chat=chat)
            model = self._handle(req.model)
            info = await self._decoder_info(req.model)
            if not info["decoder"]:
                raise OpenAIError(f"model {req.model!r} is not a decoder with a KV cache; use its KServe routes "
                                  f"(/v2/models/{req.model}/infer)", param="model")
            if chat and not info["chat"]:
                raise OpenAIError(f"model {req.model!r} has no chat template (tokenizer_config.json); use "
                                  "/v1/completions", param="model")
            if isinstance(req.prompt, str) and not info["text"]:
                raise OpenAIError(f"model {req.model!r} has no tokenizer.json: give the prompt as token ids",
                                  param="prompt")
            events = model.generate(req)
            first = await events.__anext__()
        except Exception as e:  # noqa: BLE001 - answered in OpenAI's shape; the server stays up
            raise as_openai(e) from None
        return req, events, first

    @app.get("/v1/models")
    async def openai_models(self, request: Request):
        try:
            self._authorize(request.headers.get("authorization"))
        except ProtocolError as e:
            raise as_openai(e) from None
        names = [m for m in self.models if (await self._decoder_info(m))["decoder"]]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.started,
                                            "owned_by": "onnxshard"} for m in names]}

    @app.post("/v1/completions")
    async def openai_completions(self, request: Request):
        return await self._answer(*await self._open(request, chat=False), chat=False)

    @app.post("/v1/chat/completions")
    async def openai_chat(self, request: Request):
        return await self._answer(*await self._open(request, chat=True), chat=True)

    async def _answer(self, req: GenerateRequest, events, first: dict, *, chat: bool):
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": first["prompt_tokens"], "completion_tokens": 0, "total_tokens": first["prompt_tokens"]}

        def envelope(choice: dict, chunk: bool) -> dict:
            return {"id": ident, "object": kind + (".chunk" if chunk else ""), "created": created, "model": req.model,
                    "choices": [choice]}

        if not req.stream:
            text, ids, reason = [], [], None
            try:
                async for event in events:
                    text.append(event.get("text", ""))
                    ids += event.get("token_ids", [])
                    reason = event.get("finish_reason", reason)
            except Exception as e:  # noqa: BLE001
                raise as_openai(e) from None
            usage.update(completion_tokens=len(ids), total_tokens=usage["prompt_tokens"] + len(ids))
            body = {"index": 0, "finish_reason": reason, "token_ids": ids}
            body.update({"message": {"role": "assistant", "content": "".join(text)}} if chat else
                        {"text": "".join(text), "logprobs": None})
            return {**envelope(body, False), "usage": usage}

        async def sse():
            count = 0
            try:
                if chat:
                    yield _sse(envelope({"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}, True))
                async for event in events:
                    count += len(event.get("token_ids", []))
                    text, reason = event.get("text", ""), event.get("finish_reason")
                    if not text and reason is None:
                        continue
                    choice = {"index": 0, "finish_reason": reason, "token_ids": event.get("token_ids", [])}
                    choice.update({"delta": {"content": text} if text else {}} if chat else
                                  {"text": text, "logprobs": None})
                    yield _sse(envelope(choice, True))
                if req.include_usage:
                    usage.update(completion_tokens=count, total_tokens=usage["prompt_tokens"] + count)
                    yield _sse({"id": ident, "object": kind + ".chunk", "created": created, "model": req.model,
                                "choices": [], "usage": usage})
            except Exception as e:  # noqa: BLE001 - the status is sent already: an error event, then the end
                err = as_openai(e)
                yield _sse({"error": {"message": str(err), "type": ERROR_TYPES.get(err.status, "server_error"),
                                      "param": err.param, "code": err.code}})
            finally:  # the client went away (or the stream ended): stop generating, free the caches
                await _close(events)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _close(events) -> None:
    """End a generation's event stream: a local async generator's ``aclose`` (its ``finally`` aborts the
    sequence), a Serve handle's stream's ``cancel`` (the replica's generator is closed the same way)."""
    if hasattr(events, "aclose"):
        await events.aclose()
    elif hasattr(events, "cancel"):
        events.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

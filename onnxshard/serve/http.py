"""The FastAPI app every route of the ingress is registered on (the KServe routes in ``ingress.py``, the OpenAI
routes in ``openai.py``), with the error handlers that keep FastAPI's ``{"detail"}`` out of both protocols."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from onnxshard.serve.tensors import ProtocolError

app = FastAPI(title="onnxshard", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ProtocolError)
async def _protocol_error(_, exc: ProtocolError):
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = exc.detail if isinstance(exc.detail, str) else "not found"
    if request.url.path.startswith("/v1/"):  # OpenAI's shape on its routes
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    return JSONResponse({"error": f"bad request: {exc.errors()[:1]}"}, status_code=400)

"""The HTTP routes: OpenAI chat completions and models, health, readiness, reload, and the chat page."""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mlx_lora.core.errors import UserError
from mlx_lora.serve.protocol import ApiError, chunk, completion, parse_chat, pieces
from mlx_lora.serve.service import Outcome, Prepared, Service

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
# Shown at / until the chat page is installed beside this module.
PLACEHOLDER = (
    "<!doctype html><meta charset=utf-8><title>mlx-lora serve</title>"
    "<p>mlx-lora serve is running. POST /v1/chat/completions (OpenAI format); GET /v1/models, /health, /ready.</p>"
)


def _error(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes whether or not the client announced its length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", "request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
    return bytes(body)


def create_app(service: Service) -> FastAPI:
    settings = service.settings
    app = FastAPI(title="mlx-lora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown path, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug: one line in the log, no traceback out
        print(f"error: {request.method} {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error(ApiError(500, "internal error (logged by the server)", "internal_error", "server_error"))

    def check_key(request: Request) -> None:
        if not settings.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def page():
        if PAGE.is_file():
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))
        return HTMLResponse(PLACEHOLDER)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        status = service.status()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": service.name, "object": "model", "created": int(time.time()), "owned_by": "mlx-lora"}],
        }

    @app.post("/admin/reload")
    async def reload(request: Request):
        check_key(request)
        try:
            return await asyncio.to_thread(service.reload)  # requests keep being answered meanwhile
        except UserError as exc:
            print(f"error: reload failed, keeping the previous rules and KB: {exc}", file=sys.stderr)
            raise ApiError(
                422, f"reload failed, the previous rules and KB stay in use: {exc}", "reload_failed"
            ) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        raw = await _read_body(request, settings.max_body_bytes)
        req = parse_chat(
            raw, service.name, service.cfg.generate.max_new_tokens, settings.max_tokens_cap, service.cfg.generate
        )
        prepared = await service.prepare(req)
        if req.stream:
            return StreamingResponse(
                _events(service, prepared), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        outcome = await service.finish(prepared)
        return completion(
            prepared.request_id,
            service.name,
            outcome.answer,
            outcome.finish,
            outcome.field(prepared.request_id, service.replaced(outcome, prepared.answering)),
            _usage(outcome),
        )

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    return app


def _usage(outcome: Outcome) -> dict:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


async def _events(service: Service, prepared: Prepared):
    """The stream: the decision first (its `mlx_lora` field), then the accepted text, the finish chunk, [DONE].

    Text is sent only once the decision layer has accepted it, so the first text arrives when the whole answer
    is generated and decided: streaming saves no time to first token here, only rendering."""
    rid, name = prepared.request_id, service.name
    try:
        outcome = await service.finish(prepared)
    except ApiError as exc:  # the status line is already sent: the error travels as an event, as OpenAI's does
        yield f"data: {json.dumps(exc.body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
        return
    extra = outcome.field(rid, service.replaced(outcome, prepared.answering))
    yield chunk(rid, name, {"role": "assistant", "content": ""}, mlx_lora=extra)
    for piece in pieces(outcome.answer):
        yield chunk(rid, name, {"content": piece})
    yield chunk(rid, name, {}, outcome.finish)
    if prepared.request.include_usage:
        yield chunk(rid, name, None, usage=_usage(outcome))
    yield "data: [DONE]\n\n"

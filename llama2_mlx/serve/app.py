"""The FastAPI app: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``
and ``POST /v1/completions`` (Server-Sent Events when ``stream`` is true).

Requests are checked here (API key, body size before parsing, JSON, fields) and
handed to the ``Engine`` as ``Job``s; the engine's events come back through an
asyncio queue. A client that disconnects cancels its job (its sequences leave the
batch). Every error is an OpenAI error object; no traceback is ever sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2_mlx.serve.engine import Engine
from llama2_mlx.serve.jobs import Done, Failed, Job
from llama2_mlx.serve.protocol import (
    APIError,
    Limits,
    Prepared,
    error_body,
    prepare_chat,
    prepare_completion,
)
from llama2_mlx.serve.responses import Reply

log = logging.getLogger("llama2_mlx.serve")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class _SSEResponse(StreamingResponse):
    """A stream whose generator is closed however the response ends, so that a client
    that went away always cancels its job."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; a body over ``limit`` bytes is refused unread."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError("invalid Content-Length header", code="invalid_request")
        if int(length) > limit:
            raise APIError(f"The request body is larger than {limit} bytes",
                           code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(f"The request body is larger than {limit} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(f"Invalid JSON in the request body ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object", code="invalid_json")
    return data


def create_app(engine: Engine, tokenizer, models: list[str], limits: Limits, *,
               api_key: Optional[str] = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The app serving ``models`` (the first is the default) through ``engine``."""
    app = FastAPI(title="llama2-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = _HTTP_CODES.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(error_body("The server had an error processing the request",
                                       "server_error"), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  api_key.encode()):
            what = "Incorrect API key provided" if got else "Missing API key (Authorization: Bearer KEY)"
            raise APIError(what, status=401, code="invalid_api_key")

    @app.get("/health")
    async def health():
        status = engine.status()
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "error", "models": models, **status},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llama2-mlx"}
            for name in models]}

    async def handle(request: Request, prepare: Callable) -> object:
        check_key(request)
        body = await read_json(request, max_body_bytes)
        p: Prepared = prepare(body, tokenizer, models, limits)
        if not engine.alive:
            raise APIError("The engine is not running", status=503, code="unavailable")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(batch: list) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, batch)
            except RuntimeError:  # the event loop is closed: the server is going down
                pass

        job = Job(p.model, p.prompt, p.config, emit, n=p.n, best_of=p.best_of,
                  logprobs=p.logprobs, top_logprobs=p.top_logprobs, stream=p.stream)
        reply = Reply(p, tokenizer)
        engine.submit(job)
        if p.stream:
            return _SSEResponse(_stream(job, events, reply), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _wait(request, job, events, reply)

    async def _wait(request: Request, job: Job, events: asyncio.Queue, reply: Reply):
        finished = False
        try:
            while True:
                try:
                    batch = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                for ev in batch:
                    if isinstance(ev, Failed):
                        finished = True
                        raise APIError(ev.message, status=ev.status)
                    reply.add(ev)
                    if isinstance(ev, Done):
                        finished = True
                        return JSONResponse(reply.response())
        finally:
            if not finished:
                engine.cancel(job)

    async def _stream(job: Job, events: asyncio.Queue, reply: Reply):
        finished = False
        try:
            for chunk in reply.first_chunks():
                yield _sse(chunk)
            while not finished:
                out = []
                for ev in await events.get():
                    if isinstance(ev, Failed):
                        out.append(_sse(error_body(ev.message, "server_error" if ev.status >= 500
                                                   else "invalid_request_error")))
                        finished = True
                        break
                    out += [_sse(chunk) for chunk in reply.chunks(ev)]
                    finished = isinstance(ev, Done)
                if out:
                    yield "".join(out)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                engine.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, prepare_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, prepare_completion)

    return app

"""The OpenAI-compatible HTTP app over a `ServingEngine` (FastAPI; run by uvicorn in `r1c serve`).

Routes: POST /v1/completions (text or token-id prompt), POST /v1/chat/completions (when the tokenizer has a chat
template), both with `stream: true` as server-sent events ending in `data: [DONE]`; GET /v1/models, /health,
/metrics (Prometheus text). A client that disconnects — during a stream or while waiting for a whole answer —
cancels its request, which frees its cache rows. Errors are OpenAI error JSON: 400 for a bad request, 404 for an
unknown model or route, 503 when over capacity (the openai client retries 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1c.errors import R1CError
from r1c.runtime.kvcache import OverCapacityError
from r1c.runtime.server.metrics import Metrics
from r1c.runtime.server.protocol import ChatCompletionRequest, CompletionRequest, Formatter, dumps, error_body
from r1c.runtime.serving import RequestHandle, ServingEngine

logger = logging.getLogger(__name__)


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _over_capacity(e: OverCapacityError) -> JSONResponse:
    if "more than the cache holds" in str(e):  # this request can never run here: the client must change it
        return _error(400, str(e), param="max_tokens")
    return _error(503, str(e), "server_error", code="over_capacity")


def create_app(serving: ServingEngine, model_name: str, metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="r1c", docs_url=None, redoc_url=None, openapi_url=None)
    codec = serving.codec

    def token_str(i: int) -> str:
        return codec.token_str(i) if codec is not None else f"token_id:{i}"

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            where = f" (at character {err['loc'][-1]})" if len(err.get("loc", ())) > 1 else ""
            return _error(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}"
                               f"{where}")
        if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
            return _error(400, "the request body is empty (expected a JSON object)")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        return _error(400, f"{where}: {err.get('msg')}" if where else str(err.get("msg")), param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "r1c"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return _error(404, "metrics are off")
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    def check_model(name: str) -> JSONResponse | None:
        if name != model_name:
            return _error(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if (bad := check_model(body.model)) is not None:
            return bad
        try:
            handle = serving.submit(body.prompt_value(), body.params())
        except OverCapacityError as e:
            return _over_capacity(e)
        except R1CError as e:
            return _error(400, str(e))
        return await _respond(Formatter("completion", model_name, token_str), handle, body.stream,
                              body.include_usage(), request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        if (bad := check_model(body.model)) is not None:
            return bad
        if codec is None or codec.chat_template is None:
            return _error(404, f"The model `{model_name}` has no chat template, so /v1/chat/completions is not "
                               "supported; use /v1/completions.", code="no_chat_template")
        try:
            ids = serving.chat_prompt([m.as_dict() for m in body.messages])
            handle = serving.submit(ids, body.params(default_max=serving.max_model_len - len(ids)))
        except OverCapacityError as e:
            return _over_capacity(e)
        except R1CError as e:
            return _error(400, str(e))
        return await _respond(Formatter("chat", model_name, token_str), handle, body.stream, body.include_usage(),
                              request)

    return app


async def _respond(fmt: Formatter, handle: RequestHandle, stream: bool, include_usage: bool,
                   request: Request) -> Response:
    if stream:
        return StreamingResponse(_sse(fmt, handle, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    texts: list[str] = []

    async def collect() -> None:
        async for ev in handle:
            if ev.token_id >= 0:
                texts.append(ev.text)

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():  # the client went away: stop generating for it
        handle.cancel()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=499)
    try:
        work.result()
    except R1CError as e:
        return _error(500, str(e), "server_error")
    out = handle.result(0)
    return Response(dumps(fmt.whole(out, texts)), media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only a disconnect arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(fmt: Formatter, handle: RequestHandle, include_usage: bool) -> AsyncIterator[str]:
    first = True
    try:
        async for ev in handle:
            yield f"data: {dumps(fmt.chunk(ev, first))}\n\n"
            first = False
        if include_usage:
            yield f"data: {dumps(fmt.usage_chunk(handle.result(0)))}\n\n"
        yield "data: [DONE]\n\n"
    except R1CError as e:
        yield f"data: {dumps(error_body(str(e), 'server_error'))}\n\n"
    finally:
        handle.cancel()  # a no-op once finished; on a client disconnect the stream is cancelled here

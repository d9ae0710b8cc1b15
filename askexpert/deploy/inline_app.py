"""The inline engine's HTTP side: one Starlette app under uvicorn, in the process that holds the models.

The request is read (bounded), validated against the export's contract, decoded, handed to the Batcher, and its
reply written, all in one process: no hand-off between an HTTP process and a model process, which is where
LitServe spends several milliseconds per request on a small CPU (docs/deploy.md has the comparison).

Endpoints: `POST /predict` (askexpert/deploy/wire.py), `GET /health` (200: the models are loaded before the
socket opens), `GET /metrics` (Prometheus), `GET /info` (the served export and the server's settings). With a
token, every endpoint wants `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from askexpert.deploy.batcher import Batcher
from askexpert.deploy.http_rules import BodyUnreadCloses, exception_handlers, unsupported_media_type
from askexpert.deploy.metrics import RequestMetricsMiddleware, exposition
from askexpert.deploy.wire import ExpertRequest, reply, short_errors, token_matches


async def bounded_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it (or its declared length) is over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _Endpoints:
    """The app's request handlers, with what they share: the Batcher, the contract's image size, the token and
    the limits."""

    def __init__(self, batcher, stored_size, token, max_body_bytes, timeout_s, info) -> None:
        self.batcher, self.stored_size, self.token = batcher, stored_size, token
        self.max_body_bytes, self.timeout_s, self.info = max_body_bytes, timeout_s, info

    def refused(self, request: Request) -> Response | None:
        if not self.token or token_matches(request.headers.get("authorization", ""), self.token):
            return None
        return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)

    @staticmethod
    def stopped() -> Response:
        # never expected; if it happens, say so at once rather than answer every request 504 after timeout_s
        return JSONResponse({"detail": "the batching thread stopped; restart the server"}, status_code=503)

    async def predict(self, request: Request) -> Response:
        if denied := self.refused(request) or unsupported_media_type(request.headers.get("content-type")):
            return denied
        timeout_s = self.timeout_s
        try:
            async with asyncio.timeout(timeout_s):  # a stalled upload must not hold a handler (or the drain)
                body = await bounded_body(request, self.max_body_bytes)
        except TimeoutError:
            return JSONResponse({"detail": f"the request was not received within {timeout_s:g} s"}, status_code=408)
        if body is None:
            return JSONResponse({"detail": f"request larger than {self.max_body_bytes} bytes"}, status_code=413)
        try:
            parsed = ExpertRequest.model_validate_json(body)
        except ValidationError as err:
            return JSONResponse({"detail": short_errors(err.errors())}, status_code=422)
        if not self.batcher.alive:
            return self.stopped()
        try:
            pending = self.batcher.submit((parsed.expert, parsed.pixels(self.stored_size)))
        except RuntimeError:  # shutting down: uvicorn has stopped accepting, so only a straggler sees this
            return JSONResponse({"detail": "the server is shutting down"}, status_code=503)
        try:
            expert, version, logits = await asyncio.wait_for(asyncio.wrap_future(pending), timeout_s)
        except TimeoutError:
            return JSONResponse({"detail": f"no answer within {timeout_s:g} s"}, status_code=504)
        except Exception:  # noqa: BLE001 (the model failed on this batch; counted in inference_errors)
            return JSONResponse({"detail": "inference failed"}, status_code=500)
        return JSONResponse(reply(expert, version, logits))

    async def health(self, request: Request) -> Response:
        return self.refused(request) or (PlainTextResponse("ok") if self.batcher.alive else self.stopped())

    async def metrics(self, request: Request) -> Response:
        return self.refused(request) or Response(exposition(), media_type="text/plain; version=0.0.4")

    async def server_info(self, request: Request) -> Response:
        return self.refused(request) or JSONResponse(self.info())


def build_app(
    batcher: Batcher,
    stored_size: int,
    token: str | None,
    max_body_bytes: int,
    timeout_s: float,
    info: Callable[[], dict],
) -> Starlette:
    endpoints = _Endpoints(batcher, stored_size, token, max_body_bytes, timeout_s, info)
    app = Starlette(
        routes=[
            Route("/predict", endpoints.predict, methods=["POST"]),
            Route("/health", endpoints.health, methods=["GET"]),
            Route("/metrics", endpoints.metrics, methods=["GET"]),
            Route("/info", endpoints.server_info, methods=["GET"]),
        ],
        exception_handlers=exception_handlers(),  # 404 and 405 (with `Allow`) in JSON, as every other error
    )
    app.add_middleware(BodyUnreadCloses)  # an early 401/408/413/415 closes the connection: its body is unread
    app.add_middleware(RequestMetricsMiddleware)  # outermost: counts what the client was answered
    return app

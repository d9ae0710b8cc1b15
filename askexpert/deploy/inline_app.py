"""The inline engine's HTTP side: one Starlette app under uvicorn, in the process that holds the models.

The request is checked and read (bounded) by http_rules.PredictGate, as on the LitServe engine, validated against
the export's contract, decoded, handed to the Batcher, and its reply written, all in one process: no hand-off
between an HTTP process and a model process, which is where LitServe spends several milliseconds per request on
a small CPU (docs/deploy.md has the comparison).

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
from askexpert.deploy.http_rules import READ_BODY, BodyUnreadCloses, PredictGate, exception_handlers
from askexpert.deploy.metrics import RequestMetricsMiddleware, exposition
from askexpert.deploy.wire import ExpertRequest, reply, short_errors, token_matches


class _Endpoints:
    """The app's request handlers, with what they share: the Batcher, the contract's image size, the token and
    the limits."""

    def __init__(self, batcher, stored_size, token, timeout_s, info) -> None:
        self.batcher, self.stored_size, self.token = batcher, stored_size, token
        self.timeout_s, self.info = timeout_s, info

    def refused(self, request: Request) -> Response | None:
        if not self.token or token_matches(request.headers.get("authorization", ""), self.token):
            return None
        return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)

    @staticmethod
    def stopped() -> Response:
        # never expected; if it happens, say so at once rather than answer every request 504 after timeout_s
        return JSONResponse({"detail": "the batching thread stopped; restart the server"}, status_code=503)

    async def predict(self, request: Request) -> Response:
        # the token, the Content-Type and the body (size, time) were checked by PredictGate, which read the body
        timeout_s = self.timeout_s
        try:
            parsed = ExpertRequest.model_validate_json(request.scope[READ_BODY])
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
    endpoints = _Endpoints(batcher, stored_size, token, timeout_s, info)
    app = Starlette(
        routes=[
            Route("/predict", endpoints.predict, methods=["POST"]),
            Route("/health", endpoints.health, methods=["GET"]),
            Route("/metrics", endpoints.metrics, methods=["GET"]),
            Route("/info", endpoints.server_info, methods=["GET"]),
        ],
        exception_handlers=exception_handlers(),  # 404 and 405 (with `Allow`) in JSON, as every other error
    )
    app.add_middleware(PredictGate, path="/predict", token=token, max_body_bytes=max_body_bytes, timeout_s=timeout_s)
    app.add_middleware(BodyUnreadCloses)  # an early 401/408/413/415 closes the connection: its body is unread
    app.add_middleware(RequestMetricsMiddleware)  # outermost: counts what the client was answered
    return app

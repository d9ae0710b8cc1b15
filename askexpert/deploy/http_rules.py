"""The HTTP rules both `serve` engines follow (RFC 9110/9112), and the numbers they follow them with.

Both engines answer HTTP with uvicorn (the inline engine in its one process, LitServe in its HTTP process), so
the rules sit at the two levels every engine has:
- the connection: `http_protocol.uvicorn_settings()` selects that module's protocol (uvicorn's httptools
  one, bounded), which limits the request head in size and time and the open connections, answers a request that
  arrives on a kept-alive connection during a drain with 503 instead of dropping it, and closes a connection
  whose request body is unread without losing the reply to a TCP reset;
- the request (ASGI, Starlette): every error body is JSON `{"detail": ...}` (`error_response`, `send_error`,
  `EXCEPTION_HANDLERS` for 404/405), a reply sent before the request's body was read closes the connection
  (`BodyUnreadCloses`), and a body that is not JSON is refused with 415 (`unsupported_media_type`);
- the /predict request (`PredictGate`, before either engine's handler): token 401, then 415, then the body read
  within `--timeout_s` (408) and the size limit (413), with the same JSON replies on both engines.

The numbers (documented in docs/deploy.md and README's serve section):
"""

from __future__ import annotations

import json

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; a longer head gets 431 and the connection is closed
HEADER_TIMEOUT_S = 10.0  # a request head not complete this long after the connection (or last reply): closed
MAX_CONNECTIONS = 1000  # open connections, or requests in flight; one more gets 503 and is closed
KEEP_ALIVE_S = 5.0  # an idle kept-alive connection is closed after this long
DRAIN_TIMEOUT_S = 30  # the longest a drain waits for the requests it accepted; then they are cancelled
DRAIN_GRACE_S = 1.0  # in a drain, an idle kept-alive connection may still send one request (answered 503)
LINGER_S = 2.0  # after a reply that closes with the body unread: discard what still arrives, this long at most

JSON_MEDIA_TYPE = "application/json"
READ_BODY = "askexpert.body"  # scope key: the request body PredictGate read
_CLOSE = (b"connection", b"close")


def error_body(detail) -> bytes:
    return json.dumps({"detail": detail}).encode()


def error_response(status: int, detail, headers: dict | None = None):
    """A Starlette response `{"detail": detail}` (FastAPI's JSONResponse is this class)."""
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def raw_error_response(status: int, detail) -> bytes:
    """A whole HTTP/1.1 reply that closes the connection, for the connection level (no request parsed yet)."""
    from http import HTTPStatus

    body = error_body(detail)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: {JSON_MEDIA_TYPE}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def send_error(send, status: int, detail, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An ASGI reply `{"detail": detail}` that closes the connection (its body may be unread)."""
    body = error_body(detail)
    start_headers = [
        (b"content-type", JSON_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        _CLOSE,
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def is_json(content_type: str | None) -> bool:
    """`application/json`, in any case, with at most a UTF-8 charset (RFC 8259: JSON on the wire is UTF-8)."""
    if not content_type:
        return False
    media_type, *parameters = (part.strip().lower() for part in content_type.split(";"))
    if media_type != JSON_MEDIA_TYPE:
        return False
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip() != "charset" or value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def unsupported_media_type(content_type: str | None):
    """The 415 reply for a request body that is not JSON, or None when it is."""
    if is_json(content_type):
        return None
    given = repr(content_type[:100]) if content_type else "none"
    return error_response(415, f"Content-Type must be {JSON_MEDIA_TYPE} (charset utf-8 allowed), got {given}")


async def http_exception_as_json(request, exc):
    """Starlette's (and FastAPI's) 404/405/... as JSON, keeping their headers (405's `Allow`)."""
    return error_response(exc.status_code, exc.detail, headers=getattr(exc, "headers", None))


def exception_handlers() -> dict:
    """For `Starlette(exception_handlers=...)` or FastAPI's `app.add_exception_handler(key, value)`."""
    from starlette.exceptions import HTTPException

    return {HTTPException: http_exception_as_json}


def _expects_body(headers) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


class BodyUnreadCloses:
    """ASGI middleware: a reply that starts before the request's body was read whole carries `Connection: close`,
    so the server closes the connection (RFC 9112 §9.6) instead of reading, or waiting for, a body no one wants:
    after an early 401, 408, 413, 415 or 503 a client cannot keep a connection busy with the rest of its upload."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _expects_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        read_whole = False

        async def receive_noting():
            nonlocal read_whole
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                read_whole = True
            return message

        async def send_closing(message):
            if message["type"] == "http.response.start" and not read_whole:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        await self.app(scope, receive_noting, send_closing)


def info_body(engine: str, args, metadata: dict, model_version: str) -> dict:
    """GET /info's reply, the same on both engines: the served export (`metadata`, with the version the models
    answer with now) and the server's settings."""
    settings = {
        "engine": engine,
        "max_batch_size": args.max_batch_size,
        "batch_window_ms": args.batch_window_ms,
        "timeout_s": args.timeout_s,
        "precision": args.precision,
    }
    return {"model": {**metadata, "model_version": model_version}, "server": settings}


class PredictGate:
    """ASGI middleware before either engine's POST /predict handler: the checks made before a request is parsed,
    with their JSON replies. (FastAPI would read any body, for as long as its client takes, before the route's
    checks ran; LitServe's own size middleware reads up to the limit first.)

    The token (401), the Content-Type (415), the declared size (413), then the body, read whole within
    `timeout_s` (408) and no larger than `max_body_bytes` (413); a client gone mid-body raises ClientDisconnect (the
    metrics count a 400; no reply can reach it). The body read whole is handed on (and kept in scope[READ_BODY])."""

    def __init__(self, app, *, path: str, token: str | None, max_body_bytes: int, timeout_s: float) -> None:
        self.app, self.path, self.token = app, path, token
        self.max_body_bytes, self.timeout_s = max_body_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        import asyncio

        from starlette.datastructures import Headers

        from askexpert.deploy.wire import token_matches

        headers = Headers(scope=scope)
        if self.token and not token_matches(headers.get("authorization", ""), self.token):
            await error_response(401, "missing or wrong bearer token")(scope, receive, send)
            return
        if refused := unsupported_media_type(headers.get("content-type")):
            await refused(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):  # a stalled upload must not hold a handler (or the drain)
                body = await self._body(headers, receive)
        except TimeoutError:
            body = 408
        if isinstance(body, int):
            await error_response(body, self._detail(body))(scope, receive, send)
            return
        scope[READ_BODY] = body
        handed_on = False

        async def replay():
            nonlocal handed_on
            if handed_on:
                return await receive()  # the next message is the client's disconnect
            handed_on = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _body(self, headers, receive) -> bytes | int:
        """The body, or the status that refuses it (413: too large)."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                from starlette.requests import ClientDisconnect

                raise ClientDisconnect()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return 413
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _detail(self, status: int) -> str:
        if status == 408:
            return f"the request was not received within {self.timeout_s:g} s"
        return f"request larger than {self.max_body_bytes} bytes"

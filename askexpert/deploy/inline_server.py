"""`serve --engine inline`: the Starlette app of askexpert/deploy/inline_app.py under uvicorn, and its drain.

The connection-level rules (bounded heads and connections, a drain that drops nothing, lingering closes) are
askexpert/deploy/http_protocol.py's, with the numbers of askexpert/deploy/http_rules.py. SIGTERM or SIGINT
drains: new connections are refused, every request already read is answered, a request arriving on a kept-alive
connection meanwhile gets 503 + `Connection: close`. The process then exits 0, or, if requests were still
running after DRAIN_TIMEOUT_S and had to be cancelled, 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT), as for an interrupted command.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

from askexpert.deploy.http_protocol import uvicorn_settings
from askexpert.deploy.http_rules import DRAIN_TIMEOUT_S, info_body


def serve_inline(
    args, sock: socket.socket, token: str | None, bundle, metadata: dict, announce: Callable[[], None]
) -> None:
    """Serve `bundle` on the listening `sock` until SIGTERM/SIGINT drains it; `metadata` is /info's model part,
    `announce` prints the banner."""
    import uvicorn

    from askexpert.deploy.batcher import Batcher
    from askexpert.deploy.expert_models import ExpertModels
    from askexpert.deploy.http_protocol import DrainingServer, allow_open_connections
    from askexpert.deploy.inline_app import build_app
    from askexpert.deploy.wire import max_request_bytes

    models = ExpertModels(
        os.path.abspath(args.export), args.threads, args.device, bundle.contract(), precision=args.precision
    ).start()
    batcher = Batcher(models.predict, args.max_batch_size, args.batch_window_ms / 1000.0)
    app = build_app(
        batcher,
        bundle.stored_size,
        token,
        max_request_bytes(bundle.stored_size),
        args.timeout_s,
        info=lambda: info_body("inline", args, metadata, models.version),
    )
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
        **uvicorn_settings(),
    )
    server = DrainingServer(config)
    received: list[int] = []

    def stop(signum, frame):
        # uvicorn handles SIGTERM/SIGINT while it runs (the drain) and raises the signal again once it has
        # drained: then this handler, not the default that would kill the process.
        received.append(signum)
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    allow_open_connections()
    announce()
    try:
        server.run(sockets=[sock])
    finally:
        batcher.close(DRAIN_TIMEOUT_S)
        sock.close()
    if not server.drained:
        raise SystemExit(128 + received[0] if received else 1)

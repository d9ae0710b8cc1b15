"""`serve --engine litserve`: LitServe's server around ExpertAPI (askexpert/deploy/expert_api.py), made to follow
the inline engine's HTTP rules (askexpert/deploy/http_rules.py), and its drain.

LitServe answers HTTP in a forked process (uvicorn + FastAPI) and runs the models in a spawned one. This module
builds that server: its HTTP process runs askexpert's uvicorn protocol and server (bounded heads and connections,
a drain that drops nothing), http_rules.PredictGate checks and reads a request's body as on the inline engine
(401/415/413/408, before FastAPI reads it), `/metrics` is added, `/info` names the version the models answer
with now, and SIGTERM drains the HTTP process before the models stop (LitServe's own shutdown stops the models
first, failing requests in flight). The differences left are in docs/deploy.md.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

import uvicorn

from askexpert.deploy import http_rules as rules
from askexpert.deploy.http_protocol import DrainingServer as HttpServer
from askexpert.deploy.http_protocol import allow_open_connections, uvicorn_settings
from askexpert.errors import UserError

# the HTTP process's drain, its idle connections' grace and lingering closes, and its exit
HTTP_EXIT_S = rules.DRAIN_TIMEOUT_S + rules.DRAIN_GRACE_S + rules.LINGER_S + 5
UNDRAINED = f"requests still unanswered after {rules.DRAIN_TIMEOUT_S} s were cancelled"
UNDRAINED_EXIT = 3  # the HTTP process's exit status for UNDRAINED (1 is also any uncaught exception's)


def _http_process(server: HttpServer, sockets) -> None:
    """The HTTP process: uvicorn until SIGTERM has drained it; exit status UNDRAINED_EXIT if it had to cancel
    requests."""
    os.environ["LITSERVE_WORKER_ID"] = "0"  # what LitServe's own HTTP process sets
    # uvicorn raises the signal again once it has drained; the handler inherited from `serve` would exit there
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    allow_open_connections()
    server.run(sockets)
    sys.exit(0 if server.drained else UNDRAINED_EXIT)


def stop_http_process(process, timeout_s: float = HTTP_EXIT_S) -> str | None:
    """SIGTERM the HTTP process (it drains, then exits) and wait for it; killed if it has not exited within
    `timeout_s`, so that it cannot keep the port. What went wrong, for the log, or None after a complete drain."""
    process.terminate()  # uvicorn: stop accepting, answer the requests it holds, exit
    process.join(timeout=timeout_s)
    if process.is_alive():
        process.kill()
        process.join()
        return f"the HTTP process had not exited {timeout_s:g} s after SIGTERM: killed, requests may be lost"
    if process.exitcode == UNDRAINED_EXIT:
        return UNDRAINED
    if process.exitcode != 0:
        return f"the HTTP process failed (exit status {process.exitcode}): requests may be lost"
    return None


def draining_server_class():
    import litserve as ls

    class DrainingServer(ls.LitServer):
        """LitServer whose SIGTERM drains: HTTP processes first (they finish what they hold), then the models.

        LitServe's own shutdown closes the model queue before the HTTP processes, failing requests in flight.
        """

        undrained_by: int | None = None  # the signal whose drain had to cancel requests (the exit status says so)

        def _start_server(self, port, num_api_servers, log_level, sockets, worker_type, **kwargs):
            # LitServe 0.2.19's own start for the one case `serve` uses (one HTTP process, forked, no MCP), with
            # askexpert's uvicorn server (http_protocol.DrainingServer: a drain that refuses nothing it accepted)
            if num_api_servers != 1 or worker_type != "process":
                raise ValueError("askexpert's LitServe engine runs one HTTP process")
            self.app.response_queue_id = 0  # which response queue the HTTP process reads (LitServe's bookkeeping)
            app = copy.copy(self.app)
            self._prepare_app_run(app)
            config = uvicorn.Config(
                app=app, port=port, log_level=log_level, timeout_graceful_shutdown=rules.DRAIN_TIMEOUT_S, **kwargs
            )
            process = multiprocessing.get_context("fork").Process(
                target=_http_process, args=(HttpServer(config), sockets), name="LitServer-0"
            )
            process.start()
            self._http_workers = {0: process}  # LitServe's shutdown stops what is still listed here
            for sock in sockets:  # the HTTP process holds the socket now; once it exits, connections are refused
                sock.close()
            signal.signal(signal.SIGTERM, self._drain)
            signal.signal(signal.SIGINT, self._drain)
            return self._http_workers

        def _drain(self, signum, frame):
            # The main thread is inside a call to LitServe's manager (waiting on its shutdown event) when the
            # signal arrives; a second call on that thread's connection would break it, so drain from a thread.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            threading.Thread(target=self._drain_then_stop, args=(signum,), name="drain", daemon=True).start()

        def _drain_then_stop(self, signum: int):
            print("askexpert serve: draining in-flight requests ...", file=sys.stderr, flush=True)
            for process in self._http_workers.values():  # one (_start_server)
                if problem := stop_http_process(process):
                    print(f"askexpert serve: {problem}", file=sys.stderr, flush=True)
                    self.undrained_by = signum
            self._http_workers.clear()  # ended (killed if need be): nothing left for LitServe's shutdown to stop
            self._shutdown_event.set()

    return DrainingServer


def drop_route(app, path: str) -> None:
    """Remove the route LitServe registered for `path`."""
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) != path]


def head_wherever_get(app) -> None:
    """HEAD answered wherever GET is, as Starlette's routes (the inline engine's) do and FastAPI's do not."""
    for route in app.router.routes:
        if getattr(route, "methods", None) == {"GET"}:
            route.methods.add("HEAD")


def serve_litserve(args, host: str, token: str | None, bundle, metadata: dict, announce: Callable[[], None]) -> None:
    """Serve `bundle` until SIGTERM/SIGINT drains it; `metadata` is /info's model part, `announce` prints the banner."""
    from fastapi import Depends, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import ValidationError

    from askexpert.deploy.expert_api import ExpertAPI
    from askexpert.deploy.metrics import RequestMetricsMiddleware, exposition
    from askexpert.deploy.wire import ExpertRequest, max_request_bytes, short_errors

    for name in bundle.expert_names:  # hash and load every model here, so a bad file is one line, not a dead worker
        bundle.session(name, 1, "cpu", args.precision)  # (CPU: this process must not hold a GPU context)
    api = ExpertAPI(
        os.path.abspath(args.export),
        token,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000.0,
        threads=args.threads,
        device=args.device,
        contract=bundle.contract(),
        precision=args.precision,
    )
    gate = {"path": "/predict", "token": token, "max_body_bytes": max_request_bytes(bundle.stored_size)}
    server = draining_server_class()(
        api,
        accelerator="cpu",  # LitServe's worker placement; the models' device is ONNX Runtime's (--device)
        timeout=args.timeout_s,
        # innermost first; LitServe adds its GZip outside them. No max_payload_size: PredictGate bounds the body.
        middlewares=[
            (rules.PredictGate, {**gate, "timeout_s": args.timeout_s}),
            rules.BodyUnreadCloses,
            RequestMetricsMiddleware,
        ],
        model_metadata=metadata,
        disable_openapi_url=True,
    )

    @server.app.get("/metrics", dependencies=[Depends(api.authorize)])
    async def prometheus_metrics() -> Response:
        return Response(content=exposition(), media_type="text/plain; version=0.0.4")

    async def server_info() -> JSONResponse:
        # LitServe's own /info shows the metadata it was built with: the version at start, stale after a reload
        return JSONResponse(rules.info_body("litserve", args, metadata, api.served_version()))

    drop_route(server.app, "/info")
    server.app.add_api_route("/info", server_info, methods=["GET"], dependencies=[Depends(api.authorize)])
    drop_route(server.app, "/")  # LitServe's "litserve running": the inline engine has no such endpoint (404)
    head_wherever_get(server.app)
    for exception, handler in rules.exception_handlers().items():  # 404, 405: JSON (FastAPI's are too; one rule)
        server.app.add_exception_handler(exception, handler)

    @server.app.exception_handler(RequestValidationError)
    async def short_validation_error(request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the whole input back (for an image, the request again), and words and places
        # its errors its own way: the inline engine's validation of the same bytes says what is wrong instead
        try:
            ExpertRequest.model_validate_json(request.scope.get(rules.READ_BODY, b""))
        except ValidationError as err:
            return JSONResponse(status_code=422, content={"detail": short_errors(err.errors())})
        return JSONResponse(status_code=422, content={"detail": short_errors(exc.errors())})  # (never seen)

    announce()
    try:
        server.run(
            host=host,
            port=args.port,
            num_api_servers=1,
            log_level=args.log_level,
            generate_client_file=False,
            api_server_worker_type="process",
            **uvicorn_settings(),  # head size and time, connections, keep-alive: as the inline engine's
        )
    except RuntimeError as err:
        if "workers failed to start" not in str(err):
            raise
        raise UserError("the expert worker failed to start (its error is in the log above)") from None
    except OSError as err:  # the port taken between the check and LitServe's own bind
        raise UserError(f"cannot listen on {host}:{args.port}: {err.strerror or err}") from None
    if server.undrained_by is not None:  # as the inline engine: 143 (SIGTERM) or 130 (SIGINT)
        raise SystemExit(128 + server.undrained_by)

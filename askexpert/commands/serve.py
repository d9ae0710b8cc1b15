"""`python -m askexpert serve --export EXPORT`: the experts of an export over HTTP, on the accelerator's host.

    python -m askexpert serve --export exports/demo --port 8000

Endpoints: `POST /predict` (one routed endpoint for every expert; wire format in askexpert/deploy/wire.py and
the README), `GET /health` (200 once every expert is loaded), `GET /metrics` (Prometheus), `GET /info`.

Two engines, the same endpoints, wire format, request schema, metrics, reload and drain:
- `inline` (default): uvicorn + Starlette in one process; the experts run in ONNX Runtime in that process,
  batched by a thread (askexpert/deploy/batcher.py). Least latency per request.
- `litserve`: Lightning's LitServe (pinned in pyproject), which answers HTTP in one process and runs the
  models in another. Kept so the two can be compared with benchmarks/serve_load.py (docs/deploy.md).

- Binds 127.0.0.1 unless `--host` says otherwise (LitServe's own default is 0.0.0.0). A host that is not a
  loopback address needs a token (`--token` or the ASKEXPERT_TOKEN environment variable); with a token every
  endpoint wants `Authorization: Bearer <token>`.
- Dynamic batching: a batch closes when `--max_batch_size` requests are in it or its first request has waited
  `--batch_window_ms`; the edge waits on every reply, so the window is short.
- Replacing the export folder (e.g. `export --overwrite true` into it) loads the new models beside the old ones
  and switches between two batches: no request is dropped, every reply names the version that answered it.
- SIGTERM (or Ctrl+C) drains: new connections are refused, every request already read is answered, one that
  arrives meanwhile on a kept-alive connection gets 503 + `Connection: close`; then it exits 0 (143/130 if
  requests still running after 30 s were cancelled). HTTP's rules and limits: askexpert/deploy/http_rules.py.
- Writes nothing into the working directory (LitServe's client.py is not generated; metrics live in a
  temporary folder removed at exit).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import tempfile

from askexpert.errors import UserError

TOKEN_ENV = "ASKEXPERT_TOKEN"
LOOPBACK = "127.0.0.1"
ENGINES = ("inline", "litserve")
# LitServe binds only these; "localhost" is taken to mean the IPv4 loopback.
LITSERVE_HOSTS = (LOOPBACK, "0.0.0.0", "::")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def parser():
    from askexpert.parsers import command_parser

    p = command_parser("serve", "Serve an export's experts over HTTP.", with_data=False)
    p.add_argument("--export", type=str, required=True, help="export folder (python -m askexpert export)")
    p.add_argument("--host", type=str, default=LOOPBACK, help="IP address to bind (a non-loopback one needs a token)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (1024-65535)")
    p.add_argument("--token", type=str | None, default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--engine", type=str, default="inline", help="inline (one process) or litserve")
    p.add_argument("--max_batch_size", type=int, default=16, help="most requests in one model batch")
    p.add_argument("--batch_window_ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--timeout_s", type=float, default=30.0, help="a request unanswered this long gets 504")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime threads per model; experts of a batch run side by side on the other cores "
        "(0: ONNX Runtime's default, all cores, one expert at a time)",
    )
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda or auto (CUDA when ONNX Runtime has it)")
    p.add_argument("--precision", type=str, default="fp32", help="fp32, or int8 (an export made with --int8 true)")
    p.add_argument("--log_level", type=str, default="warning", help="uvicorn/LitServe log level")
    return p


MAX_WINDOW_MS = 10_000


def check_args(args) -> tuple[str, str | None]:
    """(host to bind, token); refuses what would serve the wrong thing or serve it openly."""
    from askexpert.deploy.wire import check_token

    if args.engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {args.engine!r}")
    host = LOOPBACK if args.host == "localhost" else args.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"--host must be an IP address (e.g. 127.0.0.1, 0.0.0.0, ::), got {args.host!r}") from None
    if args.engine == "litserve" and host not in LITSERVE_HOSTS:
        raise UserError(f"--host {args.host}: LitServe binds 127.0.0.1, 0.0.0.0 or :: (all interfaces)")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    check_token(token)
    if not address.is_loopback and not token:
        raise UserError(f"--host {host} serves other machines: give a token with --token or ${TOKEN_ENV}")
    if not 1024 <= args.port <= 65535:
        raise UserError(f"--port must be between 1024 and 65535, got {args.port}")
    if args.log_level not in LOG_LEVELS:
        raise UserError(f"--log_level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    if args.max_batch_size < 1 or args.batch_window_ms < 0 or args.timeout_s <= 0 or args.threads < 0:
        raise UserError("--max_batch_size must be >= 1, --batch_window_ms >= 0, --timeout_s > 0, --threads >= 0")
    if args.batch_window_ms > MAX_WINDOW_MS or args.batch_window_ms >= 1000 * args.timeout_s:
        raise UserError(
            f"--batch_window_ms must be at most {MAX_WINDOW_MS} and shorter than --timeout_s "
            f"(a batch would wait longer than its requests may), got {args.batch_window_ms:g}"
        )
    listening_socket(host, args.port).close()  # a port in use is one line now, not after the models load
    return host, token


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening now: another server's bind fails at once (two merely bound sockets may share)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _stop_while_starting(signum, frame):
    # SIGTERM before the server runs: nothing is in flight, so stop cleanly (the metrics folder is removed)
    raise SystemExit(0)


def run(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    host, token = check_args(args)
    from askexpert.deploy.bundle import load_bundle, providers
    from askexpert.deploy.wire import set_contract

    # The process is left as it was found (the handler, the metrics folder's variable), whether serving ended or
    # failed to start: a caller that goes on (a test, a notebook) must not meet a handler or a folder of ours.
    previous_handler = signal.signal(signal.SIGTERM, _stop_while_starting)
    previous_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = None
    try:
        providers(args.device)  # refuses `cuda` without the CUDA provider, here, in one line
        bundle = load_bundle(args.export)
        for name in bundle.expert_names:
            bundle.model_entry(name, args.precision)  # an unknown precision, or int8 files the export lacks: one line
        set_contract(bundle.contract())  # what /predict accepts (LitServe's forked HTTP process inherits it)
        metrics_dir = tempfile.mkdtemp(prefix="askexpert-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any metric exists, in any process
        serve = _serve_inline if args.engine == "inline" else _serve_litserve
        serve(args, host, token, bundle)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if previous_metrics_dir is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous_metrics_dir
        signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)


def _metadata(args, bundle) -> dict:
    return {
        "export": bundle.folder,
        "model_version_at_start": bundle.version,  # every reply names the version that answered it
        "experts": bundle.expert_names,
        "stored_size": bundle.stored_size,  # so a client (e.g. `profile --link`) can build a valid request
    }


def _banner(args, host: str, bundle) -> None:
    where = host if ":" not in host else f"[{host}]"
    print(
        f"askexpert serve ({args.engine}): {len(bundle.expert_names)} experts of {bundle.folder} "
        f"(version {bundle.version}) on http://{where}:{args.port} — POST /predict, GET /health, GET /metrics",
        flush=True,
    )


def _serve_inline(args, host: str, token: str | None, bundle) -> None:
    from askexpert.deploy.inline_server import serve_inline

    sock = listening_socket(host, args.port)  # held from here on: no other process can take the port meanwhile
    serve_inline(args, sock, token, bundle, _metadata(args, bundle), lambda: _banner(args, host, bundle))


def _serve_litserve(args, host: str, token: str | None, bundle) -> None:
    from askexpert.deploy.litserve_server import serve_litserve

    serve_litserve(args, host, token, bundle, _metadata(args, bundle), lambda: _banner(args, host, bundle))

"""`python -m askexpert profile`: time each model on this machine and write a device profile that uses it.

    python -m askexpert profile --run runs/demo --out configs/profiles/my_device.yaml
    python -m askexpert profile --models vit_edge_patch4_32 vit_medium_patch4_32 --role edge --out edge.yaml

Each model is timed at batch 1 (what one classified image costs), in eval mode without gradients: torch's
benchmark Timer warms up, then repeats for at least `--min_run_time` seconds, and the median is kept.
Weights do not change the time, so models are built from their names (a run's checkpoints give the names
and head widths). The output is `--base_profile` with `measured_ms` added to the `--role` device(s), each time
under `MODEL/OUTPUTS/INPUT_SIDE` (a dustbin head is another model), and those devices renamed to this machine
(the times are its; the header says which fields still come from the base profile); `evaluate --profile OUT`
then uses these times instead of the FLOP estimate and its report says so.

    python -m askexpert profile --link http://orin.local:8000 --out configs/profiles/my_link.yaml

`--link URL` measures the link to a running `python -m askexpert serve` (with or without timing models) and
writes `rtt_ms` and `uplink_mbps` into the profile's `link` section (see `measure_link`).
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics

import timm
import torch
import yaml

from askexpert.collab.costs import load_profile, measured_key
from askexpert.deploy.metrics import sample_sum
from askexpert.deploy.timing import percentiles, time_calls
from askexpert.errors import UserError, check_output_path
from askexpert.files.atomic import atomic_write_text

ROLES = ("edge", "near_edge", "both")


def parser():
    from askexpert.parsers import command_parser
    from askexpert.pipeline.settings import DEFAULT_PROFILE

    p = command_parser(
        "profile", "Time each model at batch 1 on this machine; write a device profile.", with_data=False
    )
    p.add_argument("--run", type=str | None, default=None, help="pipeline run whose models to time")
    p.add_argument("--models", nargs="+", type=str, default=None, help="model names to time (instead of --run)")
    p.add_argument("--num_classes", type=int, default=100, help="head width for --models")
    p.add_argument("--image_size", type=int, default=32, help="input side for --models")
    p.add_argument("--base_profile", type=str, default=DEFAULT_PROFILE, help="profile to copy the other fields from")
    p.add_argument(
        "--role", type=str, default="both", help="which device this machine stands for: edge, near_edge, both"
    )
    p.add_argument("--out", type=str, required=True, help="profile YAML to write")
    p.add_argument("--min_run_time", type=float, default=1.0, help="seconds of timing per model")
    p.add_argument("--device", type=str, default="cpu", help="torch device to time on (cpu, cuda)")
    p.add_argument("--link", type=str | None, default=None, help="URL of a running `askexpert serve` to measure")
    p.add_argument("--link_token", type=str | None, default=None, help="its bearer token (default: $ASKEXPERT_TOKEN)")
    p.add_argument("--link_requests", type=int, default=50, help="timed requests per measurement of the link")
    return p


def run_models(run_dir: str) -> list[tuple[str, int, int]]:
    """(model name, head width, image size) of every model of a pipeline run trained so far, without duplicates
    (a run still training has its first models timed)."""
    from askexpert.files.checkpoints import load_checkpoint
    from askexpert.pipeline.finished_run import open_run

    run = open_run(run_dir)
    found = []
    for path in run.model_checkpoints():
        h = load_checkpoint(path, mmap=True).get("hyper_parameters", {})
        size = int(h.get("image_size") or run.settings.data.image_size)  # the size the model computes at
        entry = (h["model_name"], int(h["num_classes"]) + int(bool(h.get("other_output"))), size)
        if entry not in found:
            found.append(entry)
    if not found:
        raise UserError(f"{run_dir} holds no trained model yet (no checkpoints/best.ckpt)")
    return found


@torch.no_grad()
def time_model(model_name: str, num_outputs: int, image_size: int, device: str, min_run_time: float) -> float:
    """Median milliseconds of one batch-1 forward pass."""
    from askexpert.models import create_network

    model = create_network(model_name, num_outputs, 0.0, image_size).eval().to(device)
    image = torch.rand(1, 3, image_size, image_size, device=device)
    try:
        model(image)
    except (AssertionError, RuntimeError) as err:
        raise UserError(
            f"{model_name} cannot take {image_size}x{image_size} images: {str(err).splitlines()[0]}"
        ) from None
    for _ in range(5):  # warm-up: first calls allocate and pick kernels
        model(image)
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")  # warns about CUDA_HOME on CPU-only machines
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        cpp_logger.setLevel(level)
    timer = benchmark.Timer(stmt="model(image)", globals={"model": model, "image": image})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def machine_name(device: str) -> str:
    """What this machine's measured times are named after: the GPU, or the host's CPU and thread count."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))} ({platform.node()})"
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} ({cpu}, {torch.get_num_threads()} threads)"


def check_arguments(args) -> None:
    """Everything about the arguments, before anything is timed or written."""
    import askexpert.models

    if args.role not in ROLES:
        raise UserError(f"unknown role {args.role!r}; roles: {', '.join(ROLES)}")
    if args.run is not None and args.models is not None:
        raise UserError("give either --run DIR or --models NAME ..., not both")
    if args.run is None and args.models is None and args.link is None:
        raise UserError("give --run DIR or --models NAME ... (models to time), --link URL (a link to measure), or both")
    if args.link is not None and not args.link.startswith(("http://", "https://")):
        raise UserError(f"--link {args.link}: give the server's URL, e.g. http://127.0.0.1:8000")
    if args.link_requests < 5:
        raise UserError("--link_requests must be at least 5 (the medians need a few samples)")
    for name in args.models or []:
        if not timm.is_model(name):
            raise UserError(f"unknown model {name!r}; askexpert models: {', '.join(askexpert.models.model_names())}")
    if args.num_classes < 1 or args.image_size < 1 or args.min_run_time <= 0:
        raise UserError("--num_classes and --image_size must be at least 1 and --min_run_time positive")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown --device {args.device!r}; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: profile times cpu or cuda")
    check_output_path(args.out, "--out", "file")


WARMUPS = 3  # requests before any timing: the connection is open and the server's first-call costs are paid


def _server_mean_s(before: str, after: str, name: str, label: str = "") -> float:
    """The server's mean time per observation of a histogram between two /metrics pages (0 without any)."""
    count = sample_sum(after, f"{name}_count", label) - sample_sum(before, f"{name}_count", label)
    total = sample_sum(after, f"{name}_sum", label) - sample_sum(before, f"{name}_sum", label)
    return total / count if count > 0 else 0.0


def _wire_bytes(request) -> int:
    """What an HTTP/1.1 request occupies on the wire: request line, headers, blank line, body."""
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    head += "".join(f"{k.decode()}: {v.decode()}\r\n" for k, v in request.headers.raw) + "\r\n"
    return len(head.encode()) + len(request.content)


def measure_link(url: str, token: str | None = None, requests: int = 50) -> dict:
    """The link to a running `askexpert serve`, as one edge client sees it, on one kept-alive connection.

    rtt_ms: the median `GET /health` round trip (after WARMUPS; no handshake counted) less the server's own mean
    time for /health (askexpert_request_seconds{path="/health"} in `/metrics`; with `--engine litserve` the
    health check asks a multiprocessing manager for the workers' status, 1-3 ms on a small busy CPU, which is
    not the network).
    uplink_mbps: from `POST /predict` with a valid request (a random image of the server's stored size, from
    `GET /info`): transfer = median POST time - rtt - the server's model time per request (the delta of
    askexpert_expert_seconds sum/count), uplink = request bytes on the wire * 8 / transfer. The server's own time
    for /predict cannot be subtracted instead: its clock starts at the headers, so it holds the body's transfer.
    So what else the server spends on a request (batch window, JSON and base64, hand-offs between threads or
    processes) lands in `transfer`: this is an effective rate, the one that makes the cost model's offload
    time (transfer + rtt + model) match what a client sees, and a lower bound on the raw link rate. On a fast
    link it mostly measures that overhead (3-7 ms per request on a 2-core test machine, by engine; over
    loopback, with no link to speak of, LitServe's came out near 5 Mbit/s). It is None, with the reason
    in `note`, when transfer is not positive or within the spread of the POST times, or when the server does
    not tell its image size. Other clients of the server during the measurement skew the server's times.
    """
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # trust_env=False: a proxy from the environment would be measured instead of the link
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10.0, trust_env=False) as client:
        try:
            rtt, result = _round_trip(client, url, requests)
            request = _upload_request(client, url)
            if request is None:
                result["note"] = f"{url}/info does not give the image size (an older askexpert serve?)"
                return result
            posts, before, after = _timed(client, lambda: _checked(client.send(request), url, "/predict"), requests)
        except httpx.HTTPError as err:
            raise UserError(f"cannot measure the link to {url}: {type(err).__name__}: {err}") from None
        except (ValueError, AttributeError):  # /info is not an askexpert server's
            raise UserError(f"{url} is not an askexpert server (its /info is not what `serve` answers)") from None
    return _add_uplink(result, rtt, posts, (before, after), request)


def _checked(reply, url: str, path: str):
    """`reply`, refused unless it is a 200 (a 401 asks for the token)."""
    if reply.status_code == 401:
        raise UserError(f"{url} answered 401 to {path}: give the server's token with --link_token")
    if reply.status_code != 200:
        raise UserError(f"{url}{path} answered {reply.status_code}: {reply.text[:200].strip()}")
    return reply


def _metrics_page(client) -> str:
    reply = client.get("/metrics")  # a server without it (or another program): no server times
    return reply.text if reply.status_code == 200 else ""


def _timed(client, send, requests: int) -> tuple[list[float], str, str]:
    """(seconds of each of `requests` calls of `send` after WARMUPS, /metrics before, /metrics after)."""
    for _ in range(WARMUPS):
        send()
    before = _metrics_page(client)
    return time_calls(send, requests), before, _metrics_page(client)


def _round_trip(client, url: str, requests: int) -> tuple[float, dict]:
    """(rtt in seconds, the result's first fields): the median GET /health less the server's own time for it."""
    health, before, after = _timed(client, lambda: _checked(client.get("/health"), url, "/health"), requests)
    server_s = _server_mean_s(before, after, "askexpert_request_seconds", 'path="/health"')
    rtt = max(statistics.median(health) - server_s, 0.0)
    return rtt, {"rtt_ms": rtt * 1e3, "health_server_ms": server_s * 1e3, "uplink_mbps": None, "requests": requests}


def _upload_request(client, url: str):
    """A valid POST /predict (a random image of the size `GET /info` gives), or None when /info does not say."""
    import base64

    import numpy as np

    model = _checked(client.get("/info"), url, "/info").json().get("model") or {}
    if not model.get("stored_size") or not model.get("experts"):
        return None
    size = int(model["stored_size"])
    image = np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8).tobytes()
    body = {"expert": model["experts"][0], "image": base64.b64encode(image).decode("ascii")}
    return client.build_request("POST", "/predict", json=body)


def _add_uplink(result: dict, rtt: float, posts: list[float], metrics: tuple[str, str], request) -> dict:
    """`result` with the upload's figures: the effective uplink, or a note on why it is not measurable."""
    before, after = metrics
    model_s = _server_mean_s(before, after, "askexpert_expert_seconds")
    post_s = statistics.median(posts)
    transfer = post_s - rtt - model_s
    q1, q3 = percentiles(posts, (25, 75), method="exclusive").values()
    result.update(post_ms=post_s * 1e3, model_ms=model_s * 1e3, request_bytes=_wire_bytes(request))
    # shown, not used: the server's own time per /predict (from its headers on, so it holds part of the transfer)
    result["in_server_ms"] = _server_mean_s(before, after, "askexpert_request_seconds", 'path="/predict"') * 1e3
    if transfer <= 0:
        result["note"] = f"uplink not measurable: POST {post_s * 1e3:.2f} ms <= rtt + model time"
    elif transfer < (q3 - q1) / 2:
        result["note"] = (
            f"uplink unstable: its transfer time {transfer * 1e3:.2f} ms is within the spread "
            f"(+-{(q3 - q1) / 2 * 1e3:.2f} ms) of the POST times"
        )
    else:
        result["uplink_mbps"] = result["request_bytes"] * 8 / transfer / 1e6
    return result


def time_models(args, profile: dict) -> str:
    """Time the models of --run / --models into the --role device(s) of `profile`; the header's line about it."""
    models = run_models(args.run) if args.run else [(m, args.num_classes, args.image_size) for m in args.models]
    measured = {}
    for name, width, size in models:
        ms = time_model(name, width, size, args.device, args.min_run_time)
        measured[measured_key(name, width, size)] = round(ms, 4)
        print(f"{name} ({width} outputs, {size}x{size}): {ms:.3f} ms per image at batch 1 on {args.device}", flush=True)
    roles = ("edge", "near_edge") if args.role == "both" else (args.role,)
    machine = machine_name(args.device)
    renamed = []
    for role in roles:
        section = profile[role]
        # earlier times of this device stay (models timed one by one); another device's would be mixed in: not kept
        earlier = (section.get("measured_ms") or {}) if section.get("name") == machine else {}
        section["measured_ms"] = {**earlier, **measured}
        if section.get("name") != machine:
            renamed.append(f"{role} was {section.get('name')!r}")
            section["name"] = machine
    return (
        f"measured_ms of the {', '.join(roles)} device(s) timed on {machine}"
        f"{' (' + '; '.join(renamed) + ')' if renamed else ''}"
    )


def put_link(url: str, link: dict, profile: dict) -> str:
    """Write a measured link into `profile` (the radio fields stay the base's); the header's line about it."""
    section = profile["link"]
    section["name"] = f"measured to {url}"
    section["rtt_ms"] = round(link["rtt_ms"], 3)
    fields = "rtt_ms"
    if link["uplink_mbps"] is not None:
        section["uplink_mbps"] = round(link["uplink_mbps"], 3)
        section.pop("overhead_ms", None)  # the effective uplink already holds it: not counted twice
        fields = "rtt_ms and uplink_mbps (effective: includes the server's per-request overhead)"
        print(
            f"link to {url}: rtt {link['rtt_ms']:.2f} ms (median of {link['requests']} GET /health, less the "
            f"server's {link['health_server_ms']:.2f} ms), uplink "
            f"{link['uplink_mbps']:.2f} Mbit/s effective ({link['request_bytes']} bytes per POST /predict: "
            f"{link['post_ms']:.2f} ms, of which model {link['model_ms']:.2f} ms; in the server from the headers "
            f"on {link['in_server_ms']:.2f} ms)",
            flush=True,
        )
    else:
        print(f"link to {url}: rtt {link['rtt_ms']:.2f} ms; {link['note']}; uplink_mbps kept from the base profile")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"link {fields} measured to {url} at {when}"


def run(argv: list[str]) -> dict:
    from askexpert.pipeline.settings import find_config_file

    args = parser().parse_args(argv)
    check_arguments(args)
    args.base_profile = find_config_file(args.base_profile, "base profile")
    load_profile(args.base_profile)  # checked before timing anything
    with open(args.base_profile, encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    from askexpert.commands.serve import TOKEN_ENV
    from askexpert.deploy.wire import check_token

    token = args.link_token or os.environ.get(TOKEN_ENV) or None  # the same default as the server's
    check_token(token)
    # the link first: an unreachable server stops the command before minutes of model timing
    link = measure_link(args.link, token, args.link_requests) if args.link else None
    done = [time_models(args, profile)] if args.run or args.models else []
    if link is not None:
        done.append(put_link(args.link, link, profile))
    profile["name"] = os.path.splitext(os.path.basename(args.out))[0]
    kept = "rates, powers, link" if link is None else "rates, powers, radio"
    if link is not None and link["uplink_mbps"] is None:
        kept += ", uplink_mbps"
    header = (
        f"# Written by `python -m askexpert profile` on {datetime.date.today()}: {'; '.join(done)};\n"
        f"# every other field ({kept}) copied from {args.base_profile}.\n"
    )
    atomic_write_text(args.out, header + yaml.safe_dump(profile, sort_keys=False))
    print(f"profile written to {args.out}")
    return profile

"""`serve --engine litserve` under abuse and against HTTP's conventions (issue 27, items 17-24): the replies the
inline engine gives, from LitServe's HTTP process. One server for the module (LitServe starts slowly); the drain
tests run benchmarks/drain_load.py, which starts a server per round (SIGTERM ends it)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import sys
import time

import httpx
import pytest
from conftest import REPO, load_script
from helpers.serve_fuzz import KINDS, fuzz
from test_deploy import Server, random_image, request

from askexpert.deploy import http_rules as rules
from askexpert.deploy.http_protocol import HEAD_TOO_LONG, allow_open_connections
from askexpert.deploy.litserve_server import UNDRAINED, UNDRAINED_EXIT, stop_http_process
from askexpert.deploy.metrics import sample_sum
from askexpert.files.atomic import atomic_write_text

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 2  # the server's --timeout_s: a stalled body gets 408 this soon
BODY = json.dumps(request("expert_0", random_image())).encode()
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def litserve(tiny_export, tmp_path_factory):
    """(server, its export copy, its folder): LitServe with a token, on a copy the reload test rewrites."""
    folder = tmp_path_factory.mktemp("abuse_litserve")
    export = folder / "export"
    shutil.copytree(tiny_export[0], export)
    extra = ("--engine", "litserve", "--timeout_s", str(TIMEOUT_S))
    server = Server(export, folder, *extra, env={"ASKEXPERT_TOKEN": TOKEN}).wait_ready(headers=AUTH)
    yield server, export, folder
    server.kill()


def exchange(port: int, data: bytes, wait_s: float = 5.0) -> tuple[bytes, str]:
    """Send raw bytes; (what came back, how it ended: "eof", "reset" or "open" after `wait_s`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
            return received, "eof"
        except TimeoutError:
            return received, "open"
        except ConnectionResetError:
            return received, "reset"


def parse(raw: bytes) -> tuple[int, dict, dict | None]:
    """(status, headers in lower case, JSON body or None) of one raw HTTP/1.1 reply."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def post_head(length: int, content_type: str = "application/json", auth: bool = True) -> bytes:
    lines = ["POST /predict HTTP/1.1", "Host: x", f"Content-Type: {content_type}", f"Content-Length: {length}"]
    return ("\r\n".join([*lines, *([f"Authorization: Bearer {TOKEN}"] if auth else [])]) + "\r\n\r\n").encode()


def predict_statuses(server) -> dict[str, float]:
    page = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return {s: sample_sum(page, "askexpert_requests_total", f'status="{s}"') for s in ("200", "400", "500")}


def test_a_wrong_content_type_gets_415_in_json_and_json_is_served(litserve):  # item 20
    server, _, _ = litserve
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
        reply = httpx.post(f"{server.url}/predict", content=BODY, headers={**AUTH, "Content-Type": content_type})
        assert reply.status_code == 415 and "Content-Type must be application/json" in reply.json()["detail"]
    raw, _ = exchange(server.port, post_head(len(BODY)).replace(b"Content-Type: application/json\r\n", b"") + BODY)
    assert parse(raw)[0] == 415  # no Content-Type at all
    for content_type in ("application/json", "Application/JSON; charset=UTF-8"):
        reply = httpx.post(f"{server.url}/predict", content=BODY, headers={**AUTH, "Content-Type": content_type})
        assert reply.status_code == 200 and reply.json()["expert"] == "expert_0"


def test_404_and_405_are_json_and_405_says_what_is_allowed(litserve):  # item 22
    server, _, _ = litserve
    for path in ("/nowhere", "/"):  # `/`: LitServe's own "litserve running" is gone, as on the inline engine
        missing = httpx.get(f"{server.url}{path}", headers=AUTH)
        assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    assert httpx.head(f"{server.url}/health", headers=AUTH).status_code == 200  # HEAD wherever GET, as Starlette
    for method, path, allowed in (("GET", "/predict", "POST"), ("POST", "/health", "GET"), ("DELETE", "/info", "GET")):
        reply = httpx.request(method, f"{server.url}{path}", headers=AUTH)
        assert reply.status_code == 405 and reply.json() == {"detail": "Method Not Allowed"}
        assert allowed in reply.headers["allow"]


def test_a_malformed_body_gets_the_inline_engines_422(litserve):
    server, _, _ = litserve
    expected = {
        b"{not json": [{"loc": [], "msg": "Invalid JSON: key must be a string at line 1 column 2"}],
        b'{"expert": "expert_0"}': [{"loc": ["image"], "msg": "Field required"}],
        b"[1, 2]": [{"loc": [], "msg": "Input should be an object"}],
    }
    for body, errors in expected.items():
        reply = httpx.post(f"{server.url}/predict", content=body, headers={**AUTH, **JSON})
        assert reply.status_code == 422 and reply.json() == {"detail": errors}, body


def test_an_early_413_or_401_closes_the_connection_with_the_body_unread(litserve):  # item 24 (and 413)
    server, _, _ = litserve
    limit = 4 * -(-3 * 32 * 32 // 3) + 1024
    raw, ending = exchange(server.port, post_head(10_000_000) + b"x" * 200_000)
    status, headers, body = parse(raw)
    assert (status, headers["connection"], ending) == (413, "close", "eof")
    assert body == {"detail": f"request larger than {limit} bytes"}
    # no length declared: refused as soon as what arrived passes the limit
    chunked = post_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    raw, ending = exchange(server.port, chunked + b"".join(b"1000\r\n" + b"x" * 4096 + b"\r\n" for _ in range(40)))
    status, headers, _ = parse(raw)
    assert (status, headers["connection"], ending) == (413, "close", "eof")
    # without the token: refused before the body is read, and closed
    raw, ending = exchange(server.port, post_head(len(BODY), auth=False) + BODY[:100])
    status, headers, body = parse(raw)
    assert (status, headers["connection"], ending) == (401, "close", "eof")
    assert body == {"detail": "missing or wrong bearer token"}


def test_a_stalled_body_gets_408_and_a_close_and_the_server_keeps_serving(litserve):  # items 21, 24
    server, _, _ = litserve
    start = time.monotonic()
    raw, ending = exchange(server.port, post_head(len(BODY)) + BODY[:100], wait_s=TIMEOUT_S + 5)
    status, headers, body = parse(raw)
    assert (status, headers["connection"], ending) == (408, "close", "eof")
    assert body == {"detail": f"the request was not received within {TIMEOUT_S} s"}
    assert TIMEOUT_S - 0.5 < time.monotonic() - start < TIMEOUT_S + 3
    assert httpx.post(f"{server.url}/predict", content=BODY, headers={**AUTH, **JSON}).status_code == 200


def test_a_client_gone_mid_body_counts_as_400_without_a_traceback(litserve):  # item 19
    server, _, folder = litserve
    before = predict_statuses(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_head(len(BODY)) + BODY[:100])
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while predict_statuses(server)["400"] == before["400"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = predict_statuses(server)
    assert after["400"] == before["400"] + 1 and after["500"] == before["500"]
    log = (folder / f"serve-{server.port}.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log


def test_request_heads_and_connections_are_bounded(litserve):  # item 18 (the head's time: the slow test below)
    server, _, _ = litserve
    raw, ending = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    status, headers, body = parse(raw)
    assert (status, headers["connection"], ending) == (431, "close", "eof")
    assert body == {"detail": HEAD_TOO_LONG}
    # one connection more than MAX_CONNECTIONS: a JSON 503 and a close, and the server still serves after
    allow_open_connections(rules.MAX_CONNECTIONS + 200)
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(rules.MAX_CONNECTIONS + 1)]
    try:
        with selectors.DefaultSelector() as readable:
            for sock in sockets:
                readable.register(sock, selectors.EVENT_READ)
            # well within HEADER_TIMEOUT_S, after which the silent ones are closed too
            answered = [key.fileobj.recv(4096) for key, _ in readable.select(timeout=3)]
        assert len(answered) == 1, answered
        status, headers, body = parse(answered[0])
        assert (status, headers["connection"]) == (503, "close") and "open connections" in body["detail"]
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.5)
    assert httpx.get(f"{server.url}/health", headers=AUTH).status_code == 200


def test_info_names_the_version_that_answers_after_a_reload(litserve):  # item 23
    server, export, _ = litserve
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        start = client.get("/info").json()
        assert start["model"]["model_version"] == start["model"]["model_version_at_start"]
        assert start["server"]["engine"] == "litserve" and start["server"]["timeout_s"] == TIMEOUT_S
        manifest = json.loads((export / "manifest.json").read_text())
        manifest["note"] = "a new export"  # another manifest is another version
        atomic_write_text(str(export / "manifest.json"), json.dumps(manifest))
        deadline = time.monotonic() + 20
        while client.get("/info").json()["model"]["model_version"] == start["model"]["model_version"]:
            assert time.monotonic() < deadline, "the reload never showed in /info"
            time.sleep(0.1)
        info = client.get("/info").json()["model"]
        answered = client.post("/predict", content=BODY, headers=JSON).json()["model_version"]
    assert info["model_version"] == answered != info["model_version_at_start"] == start["model"]["model_version"]


# ---- random and mutated requests (tests/helpers/serve_fuzz.py, as tests/test_serve_fuzz.py runs them on inline)
def http_process(server: Server) -> int:
    """LitServe's HTTP process: the child of `serve` holding the listening socket (where memory would grow)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    inode = next(r[9] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == server.port)  # 0A: LISTEN
    main = server.process.pid
    with open(f"/proc/{main}/task/{main}/children") as children:
        for child in children.read().split():
            for fd in os.listdir(f"/proc/{child}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{child}/fd/{fd}") == f"socket:[{inode}]":
                        return int(child)
    raise AssertionError("no child of serve listens")


def fuzz_litserve(server: Server, count: int, seeds: range) -> None:
    """On the module's server (its token on every exchange): LitServe starts slowly, so no server of its own."""
    for seed in seeds:
        report = fuzz(server.port, http_process(server), count, seed=seed, token=TOKEN)
        assert not report.broken, "\n".join(report.broken[:20])
        assert report.sent == count and set(report.statuses) == set(KINDS)
        assert sum(c.get("200", 0) for c in report.statuses.values()) > 0  # the valid ones were served
    assert httpx.post(f"{server.url}/predict", content=BODY, headers={**AUTH, **JSON}).status_code == 200
    log = open(server.log.name).read()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


# slow: the same fuzz runs on the inline engine in the default run (tests/test_serve_fuzz.py)
@pytest.mark.slow
def test_random_and_mutated_requests_leave_litserve_up_answering_and_bounded(litserve):
    fuzz_litserve(litserve[0], count=300, seeds=range(1))


@pytest.mark.slow
def test_thousands_of_random_and_mutated_requests_on_litserve(litserve):
    fuzz_litserve(litserve[0], count=1000, seeds=range(1, 6))


# ---- item 17: SIGTERM under load (benchmarks/drain_load.py: 16 kept-alive clients, SIGTERM, every request followed)
@pytest.mark.slow  # the inline engine's drain test covers the shared drain in the default run
def test_sigterm_under_16_keep_alive_clients_loses_no_request(tiny_export):  # item 17, one round
    result = load_script(REPO / "benchmarks" / "drain_load.py").run(str(tiny_export[0]), "litserve", 1, 16)
    assert result["passed"] and result["totals"]["lost"] == 0 and result["totals"]["answered_200"] > 0, result


@pytest.mark.slow
def test_sigterm_under_load_20_times_loses_no_request(tiny_export):  # item 17, the acceptance
    result = load_script(REPO / "benchmarks" / "drain_load.py").run(str(tiny_export[0]), "litserve", 20, 16)
    assert result["passed"] and result["totals"]["lost"] == 0 and result["clean_exits"] == 20, result


@pytest.mark.slow
def test_a_drain_cut_short_by_its_timeout_exits_143(tiny_export, tmp_path):  # item 17: cancelled, and said so
    server = Server(tiny_export[0], tmp_path, "--engine", "litserve", "--timeout_s", "120").wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
            stalled.sendall(post_head(100, auth=False) + b"x" * 50)  # a body that never ends: held past the drain
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=rules.DRAIN_TIMEOUT_S + 20) == 128 + signal.SIGTERM
    finally:
        server.kill()


@pytest.mark.slow
def test_a_request_head_not_complete_in_time_gets_408_and_a_close(litserve):  # item 18, the head's time
    server, _, _ = litserve
    start = time.monotonic()
    raw, ending = exchange(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\n", wait_s=rules.HEADER_TIMEOUT_S + 5)
    status, headers, _ = parse(raw)
    assert (status, headers["connection"], ending) == (408, "close", "eof")
    assert abs(time.monotonic() - start - rules.HEADER_TIMEOUT_S) < 2
    with socket.create_connection(("127.0.0.1", server.port), timeout=rules.HEADER_TIMEOUT_S + 5) as idle:
        start = time.monotonic()
        assert idle.recv(100) == b"" and abs(time.monotonic() - start - rules.HEADER_TIMEOUT_S) < 2  # silent: closed


def _ignore_sigterm_then_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


@pytest.mark.parametrize(
    ("target", "args", "said"),
    [
        (_ignore_sigterm_then_sleep, (), "killed"),  # would hold the port: killed, not left behind
        (sys.exit, (UNDRAINED_EXIT,), UNDRAINED),
        (sys.exit, (1,), "failed (exit status 1)"),  # a crash is not reported as a drain's timeout
        (sys.exit, (0,), None),
    ],
)
def test_the_http_process_is_stopped_and_its_exit_reported_for_what_it_means(target, args, said):  # review F
    process = multiprocessing.get_context("fork").Process(target=target, args=args)
    process.start()
    time.sleep(0.2)  # its SIGTERM handler in place
    problem = stop_http_process(process, timeout_s=0.5)
    assert not process.is_alive()
    assert problem is None if said is None else said in problem


def test_a_body_whose_chunked_framing_breaks_gets_400_at_once(litserve):  # review E: not a 408 after TIMEOUT_S
    server, _, _ = litserve
    before = predict_statuses(server)
    chunked = post_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(chunked + b'5\r\n{"exp\r\n')  # one good chunk: the gate is reading the body
        time.sleep(0.3)
        start = time.monotonic()
        sock.sendall(b"zz\r\nnot a chunk\r\n")  # then a chunk size that is not hexadecimal
        sock.settimeout(TIMEOUT_S + 3)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, headers, body = parse(raw)
    assert (status, headers["connection"]) == (400, "close") and body["detail"]
    assert time.monotonic() - start < 1
    deadline = time.monotonic() + 3
    while predict_statuses(server)["400"] == before["400"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predict_statuses(server)["400"] == before["400"] + 1

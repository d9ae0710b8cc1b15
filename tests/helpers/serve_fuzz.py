"""Random and mutated HTTP requests over raw sockets against a live `serve` (either engine), and what came back.

`fuzz(port, pid, count, seed)` sends `count` exchanges, each of a kind drawn from KINDS (bad request lines, huge
or garbage headers, wrong methods, broken framing, truncated bodies, random JSON, mutated valid requests, ...),
eight at a time, and returns a FuzzReport: replies by kind and status, and the broken promises:
- a 5xx other than 503 (the server failing on input, not refusing it);
- an error reply (4xx/5xx) whose body is not JSON `{"detail": ...}`;
- the server process gone, or its resident memory grown by more than `max_growth_mib`.
The server should run with a short `--timeout_s` (a stalled body is answered 408 after it).
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

HOST = "127.0.0.1"
PATHS = ("/predict", "/health", "/metrics", "/info")
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO", "get", "P0ST")
CONTENT_TYPES = (
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "application/jsonx",
    "",
    "*/*",
    "application/json;;;",
)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def request(method: str, path: str, headers: dict | list, body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
    pairs = headers.items() if isinstance(headers, dict) else headers
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    return head.encode("latin-1") + body


def predict(body: bytes, content_type: str = "application/json", **extra) -> bytes:
    headers = {"Host": "x", "Content-Type": content_type, "Content-Length": str(len(body)), **extra}
    return request("POST", "/predict", headers, body)


class Kinds:
    """Each method draws one exchange: (bytes to send, whether to half-close after sending: a truncated request
    whose end the server can only learn from the close)."""

    def __init__(self, experts: list[str], stored_size: int) -> None:
        self.experts, self.size = experts, stored_size

    def valid_body(self, rng: random.Random) -> bytes:
        image = bytes(rng.getrandbits(8) for _ in range(3 * self.size * self.size))
        return json.dumps({"expert": rng.choice(self.experts), "image": base64.b64encode(image).decode()}).encode()

    def random_bytes(self, rng):
        return rng.randbytes(rng.choice((1, 10, 100, 5000, 40000))), rng.random() < 0.5

    def bad_request_line(self, rng):
        lines = [
            "GET",
            "GET /health",
            "GET /health HTTP/9.9",
            "GET  /health  HTTP/1.1",
            "GET /health HTTP/1.1 x",
            "/health GET HTTP/1.1",
            "GET\t/health\tHTTP/1.1",
            "GET http://evil/health HTTP/1.1",
            "GET * HTTP/1.1",
            "GET /%zz HTTP/1.1",
            "GET /\x00 HTTP/1.1",
            "GET /" + "a" * 20000 + " HTTP/1.1",
            "GET /health?" + "q=1&" * 5000 + " HTTP/1.1",
            "\r\n\r\nGET /health HTTP/1.1",
            "GET /héalth HTTP/1.1",
        ]
        return (rng.choice(lines) + "\r\nHost: x\r\n\r\n").encode("utf-8"), False

    def huge_headers(self, rng):
        shape = rng.choice(("one", "many", "stream"))
        if shape == "one":
            headers = {"Host": "x", "X-Big": "a" * rng.choice((17000, 100_000, 1_000_000))}
        elif shape == "many":
            headers = [("Host", "x")] + [(f"X-{i}", "v" * 20) for i in range(rng.choice((200, 1000, 5000)))]
        else:
            headers = {"Host": "x", "Cookie": "c=" + "z" * 3_000_000}
        return request("GET", "/health", headers), False

    def garbage_headers(self, rng):
        bad = [
            "X-A\x00: b",
            "X-A b",
            ": empty-name",
            "X-A:\x7fb",
            "Host: x\r\n folded",
            "X-\xff: y",
            "Content-Length: -5",
            "Content-Length: 1e3",
            "Content-Length: 5, 7",
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: chunked, identity",
            "Host: a\r\nHost: b",
            "X-A:" + "\x01" * 50,
            "\x80\x81: \x82",
        ]
        head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + rng.choice(bad)
        return (head + "\r\n\r\n").encode("latin-1"), True

    def wrong_method(self, rng):
        body = self.valid_body(rng) if rng.random() < 0.5 else b""
        headers = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body))}
        return request(rng.choice(METHODS), rng.choice(PATHS), headers, body), False

    def random_path(self, rng):
        paths = [
            "/",
            "/predict/",
            "/PREDICT",
            "/../etc/passwd",
            "/%2e%2e/",
            "/predict%00",
            "/docs",
            "/openapi.json",
            "//predict",
            "/predict;x",
            "/\u00e9".encode().decode("latin-1"),
            "/" + "x" * 5000,
            "/health#frag",
        ]
        return request(rng.choice(("GET", "POST")), rng.choice(paths), {"Host": "x"}), False

    def truncated_body(self, rng):
        body = self.valid_body(rng)
        return predict(body)[: -rng.randint(1, len(body))], True

    def framing(self, rng):
        body = self.valid_body(rng)
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        cases = [
            predict(body, **{"Content-Length": str(len(body) - 10)}),  # the rest looks like a next request
            request(
                "POST",
                "/predict",
                {"Host": "x", "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                chunked,
            ),  # valid chunked
            request(
                "POST",
                "/predict",
                {
                    "Host": "x",
                    "Content-Type": "application/json",
                    "Transfer-Encoding": "chunked",
                    "Content-Length": "3",
                },
                chunked,
            ),
            request(
                "POST",
                "/predict",
                {"Host": "x", "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                b"zz\r\n" + body,
            ),
            request(
                "POST",
                "/predict",
                {"Host": "x", "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                b"fffffffffffffff\r\n" + body[:100],
            ),
            predict(body, Expect="100-continue"),
            request(
                "POST",
                "/predict",
                {"Content-Type": "application/json", "Content-Length": str(len(body))},
                body,
                "HTTP/1.0",
            ),
            predict(body) + predict(b"{}") + request("GET", "/health", {"Host": "x"}),  # pipelined
        ]
        return rng.choice(cases), rng.random() < 0.3

    def random_json(self, rng):
        def value(depth):
            makers = [
                lambda: None,
                lambda: rng.random() < 0.5,
                lambda: rng.randint(-(10**30), 10**30),
                lambda: rng.random() * 1e308,
                lambda: "s" * rng.randint(0, 50),
                lambda: [value(depth + 1) for _ in range(rng.randint(0, 4))],
                lambda: {rng.choice(("expert", "image", "x", "")): value(depth + 1) for _ in range(rng.randint(0, 4))},
            ]
            return rng.choice(makers if depth < 4 else makers[:5])()

        bodies = [
            json.dumps(value(0)).encode(),
            b"[" * 100_000,
            b'{"expert": "expert_0", "image": ' + b"[" * 5000,
            b'{"expert": "expert_0", "image": "' + b"A" * 4000 + b'"}',
            b"\xff\xfe{}",
            b"",
            b"null",
            b'{"expert": "expert_0", "image": "%s"}' % base64.b64encode(b"x" * 10),
        ]
        return predict(rng.choice(bodies)), False

    def wrong_content_type(self, rng):
        return predict(self.valid_body(rng), rng.choice(CONTENT_TYPES)), False

    def mutated_valid(self, rng):
        data = bytearray(predict(self.valid_body(rng)))
        for _ in range(rng.choice((1, 3, 20))):
            operation, at = rng.randrange(4), rng.randrange(len(data))
            if operation == 0:
                data[at] = rng.getrandbits(8)  # a flipped byte, in the head or the body
            elif operation == 1:
                del data[at : at + rng.randint(1, 50)]
            elif operation == 2:
                data[at:at] = rng.randbytes(rng.randint(1, 50))
            else:
                data[at:at] = data[at : at + rng.randint(1, 200)]  # a piece repeated
        return bytes(data), rng.random() < 0.5

    def half_sent_head(self, rng):
        full = predict(self.valid_body(rng))
        return full[: rng.randint(1, full.index(b"\r\n\r\n"))], True

    def valid(self, rng):
        return predict(self.valid_body(rng)), False


KINDS = [name for name in vars(Kinds) if not name.startswith("_") and name != "valid_body"]


@dataclass
class FuzzReport:
    statuses: dict = field(default_factory=lambda: defaultdict(Counter))  # kind -> {status or outcome: count}
    broken: list = field(default_factory=list)  # the promises not kept, one line each
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())


def exchange(port: int, data: bytes, half_close: bool, timeout_s: float) -> tuple[str, bytes]:
    """('reply', the reply's bytes), or ('closed', b'') / ('no reply', b'') / ('reset', b'')."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed already (a refused head); what it answered is still readable
            pass
        received = b""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if _whole_reply(received):
                    break
            else:
                return ("no reply" if not received else "reply"), received
        except TimeoutError:
            return ("no reply" if not received else "reply"), received
        except ConnectionResetError:
            return ("reset" if not received else "reply"), received
    return ("reply" if received else "closed"), received


def _whole_reply(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def check_reply(kind: str, sent: bytes, data: bytes, report: FuzzReport) -> str:
    """The first reply's status; a broken promise noted in `report`."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0]
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        report.broken.append(f"{kind}: not an HTTP reply: {data[:80]!r}")
        return "garbled"
    if status >= 500 and status != 503:
        report.broken.append(f"{kind}: {status_line.decode('latin-1')}: {body[:200]!r}")
    if status >= 400 and not sent.startswith(b"HEAD "):  # a reply to HEAD has no body
        headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(b":") for x in head.split(b"\r\n")[1:])}
        length = int(headers.get(b"content-length", b"0"))
        try:
            detail = json.loads(body[:length])["detail"]
            assert headers.get(b"content-type", b"").startswith(b"application/json") and detail
        except (ValueError, KeyError, TypeError, AssertionError):
            report.broken.append(f"{kind}: {status} without a JSON detail: {head[:200]!r} {body[:100]!r}")
    return str(status)


def fuzz(
    port: int, pid: int, count: int, seed: int = 0, max_growth_mib: float = 64, workers: int = 8, token: str = ""
) -> FuzzReport:
    """Send `count` exchanges of random kinds (at most 30 s each are allowed to hang) and check the server; with
    a `token`, every exchange carries it after its first line (a server with a token answers the rest 401)."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    info = httpx.get(f"http://{HOST}:{port}/info", headers=auth, timeout=10).json()["model"]
    kinds = Kinds(info["experts"], info["stored_size"])
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rng.choice(KINDS)  # every kind at least once
        data, half_close = getattr(kinds, kind)(random.Random(rng.getrandbits(32)))
        if token:
            data = data.replace(b"\r\n", f"\r\nAuthorization: Bearer {token}\r\n".encode(), 1)
        plan.append((kind, data, half_close))
    report = FuzzReport(rss_before_mib=rss_mib(pid))
    start = time.monotonic()

    def one(item):
        kind, data, half_close = item
        try:
            outcome, reply = exchange(port, data, half_close, timeout_s=5.0)
        except OSError as err:  # could not even connect
            return kind, data, f"connect failed: {type(err).__name__}", b""
        return kind, data, outcome, reply

    with ThreadPoolExecutor(workers) as pool:
        for kind, data, outcome, reply in pool.map(one, plan):
            label = check_reply(kind, data, reply, report) if outcome == "reply" else outcome
            report.statuses[kind][label] += 1
            if label.startswith("connect failed"):
                report.broken.append(f"{kind}: {label}")
    report.seconds = time.monotonic() - start
    try:
        os.kill(pid, 0)
        report.rss_after_mib = rss_mib(pid)
    except (ProcessLookupError, FileNotFoundError):
        report.broken.append("the server process is gone")
        return report
    if report.rss_after_mib - report.rss_before_mib > max_growth_mib:
        report.broken.append(f"resident memory grew {report.rss_before_mib:.0f} -> {report.rss_after_mib:.0f} MiB")
    return report

"""`python -m askexpert profile --link URL`: the link measured to a server, through the emulated link of the relay.

A real `askexpert serve` takes seconds to start, so a tiny in-test HTTP server stands in for it: the same
endpoints (/health, /info, /predict, /metrics), a fixed model time, negligible overhead.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from conftest import REPO
from helpers.cli import run_main

from askexpert.commands.profile import measure_link
from askexpert.deploy.relay import LinkRelay
from askexpert.deploy.timing import percentiles, time_calls, time_for

RTT_MS, UPLINK_MBPS, MODEL_S, SIZE = 20.0, 2.0, 0.002, 32
# The relay runs in threads of the test process, on a shared 2-core machine: a busy moment adds milliseconds to a
# round trip (a CI run measured a median of 26.2 ms for 20). The bounds still tell a found RTT from a missed one
# (0, or the doubled RTT of a handshake counted).
LOW, HIGH = 0.7, 1.5
BASE = REPO / "configs" / "profiles" / "pi4_wifi_orin.yaml"


class _TinyExpertServer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as LitServe's uvicorn
    disable_nagle_algorithm = True  # or a reply's second write waits for a delayed ACK
    model_seconds = {"sum": 0.0, "count": 0}

    def do_GET(self):
        if self.path == "/health":
            self._reply(b"ok")
        elif self.path == "/info":
            self._reply(json.dumps({"model": {"experts": ["expert_0"], "stored_size": SIZE}}).encode())
        elif self.path == "/metrics":
            s = self.model_seconds
            lines = [
                f'askexpert_expert_seconds_sum{{expert="expert_0"}} {s["sum"]}',
                f'askexpert_expert_seconds_count{{expert="expert_0"}} {s["count"]}',
            ]
            self._reply("\n".join(lines).encode())
        else:
            self.send_error(404)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/predict" and len(base64.b64decode(request["image"])) == 3 * SIZE * SIZE
        time.sleep(MODEL_S)  # the model
        self.model_seconds["sum"] += MODEL_S
        self.model_seconds["count"] += 1
        self._reply(json.dumps({"expert": request["expert"], "logits": [0.0] * 25, "prediction_id": 0}).encode())

    def _reply(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # quiet


@pytest.fixture
def link_url():
    """URL of the tiny server behind a 20 ms, 2 Mbit/s uplink."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TinyExpertServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    relay = LinkRelay("127.0.0.1", server.server_address[1], rtt_ms=RTT_MS, uplink_mbps=UPLINK_MBPS).start()
    try:
        yield f"http://127.0.0.1:{relay.port}"
    finally:
        relay.stop()
        server.shutdown()
        server.server_close()


def test_measure_link_finds_the_rtt_and_the_uplink(link_url):
    link = measure_link(link_url, requests=20)
    assert RTT_MS * LOW <= link["rtt_ms"] <= RTT_MS * HIGH, link
    assert link["model_ms"] == pytest.approx(MODEL_S * 1e3)
    # effective: the overheads of client and tiny server (a ms or two, on either side of the formula) move it a little
    assert UPLINK_MBPS * LOW <= link["uplink_mbps"] <= UPLINK_MBPS * HIGH, link


def test_profile_link_alone_replaces_only_the_link(link_url, tmp_path, capsys):
    out = tmp_path / "measured_link.yaml"
    code, stdout, err = run_main(
        ["profile", "--link", link_url, "--link_requests", "5", "--base_profile", str(BASE), "--out", str(out)], capsys
    )
    assert code == 0, err
    text = out.read_text()
    written, base = yaml.safe_load(text), yaml.safe_load(BASE.read_text())
    assert written["edge"] == base["edge"] and written["near_edge"] == base["near_edge"]
    link = written["link"]
    assert link["name"] == f"measured to {link_url}" and RTT_MS * LOW <= link["rtt_ms"] <= RTT_MS * HIGH
    assert link["radio_w_per_mbps"] == base["link"]["radio_w_per_mbps"]
    assert text.startswith("# Written by") and f"measured to {link_url} at " in text.splitlines()[0]


def test_unreachable_link_is_one_line_and_writes_nothing(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "p.yaml"
    for url, message in ((f"http://127.0.0.1:{port}", "cannot measure the link"), ("127.0.0.1:8000", "give the")):
        code, _, err = run_main(["profile", "--link", url, "--out", str(out)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_timer_counts_only_the_timed_calls_and_percentiles_interpolate():
    calls = []
    times = time_calls(lambda: calls.append(time.sleep(0.002)), 3, warmups=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0.002 for t in times)
    timed = time_for(lambda: time.sleep(0.01), 0.05)
    assert 2 <= len(timed) <= 6 and all(t >= 0.01 for t in timed)
    # linear interpolation between the closest ranks (numpy's default), what `edge` reports as p50/p95/p99
    assert percentiles([4.0, 1.0, 3.0, 2.0], (50, 95, 99)) == pytest.approx({"p50": 2.5, "p95": 3.85, "p99": 3.97})
    assert percentiles([7.0], (25, 75)) == {"p25": 7.0, "p75": 7.0}


def test_exclusive_quartiles_are_what_profile_link_has_always_judged_the_spread_by():
    # statistics.quantiles' default: for 1..10 the quartiles are 2.75 and 8.25 (linear interpolation: 3.25, 7.75)
    assert percentiles(range(1, 11), (25, 75), method="exclusive") == pytest.approx({"p25": 2.75, "p75": 8.25})
    assert percentiles(range(1, 11), (25, 75)) == pytest.approx({"p25": 3.25, "p75": 7.75})

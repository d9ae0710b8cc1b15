"""The emulated link (askexpert/deploy/relay.py) against tiny local TCP servers: delay, bandwidth, integrity, loss.

The last test checks the kernel's own shaping (network namespaces, veth, `tc ... tbf`) where the machine allows.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from askexpert.deploy.relay import RTO_S, LinkRelay


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads the 8-byte length, then that many bytes, then answers one byte: the transfer is complete."""

    def handle(self):
        size = int.from_bytes(_recv_exactly(self.request, 8), "big")
        _recv_exactly(self.request, size)
        self.request.sendall(b"k")


def _recv_exactly(sock, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"closed with {left} bytes missing")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def serve():
    """serve(handler) -> port of a local TCP server answering with that handler (closed after the test)."""
    servers = []

    def start(handler) -> int:
        server = _Server(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _round_trip(sock) -> float:
    start = time.perf_counter()
    sock.sendall(b"ping")
    _recv_exactly(sock, 4)
    return time.perf_counter() - start


def test_a_small_message_takes_one_rtt(serve):
    with LinkRelay("127.0.0.1", serve(_Echo), rtt_ms=20) as relay, _connect(relay.port) as sock:
        _round_trip(sock)  # the relay connects to the server on the first bytes' way
        times = [_round_trip(sock) for _ in range(7)]
    assert min(times) >= 0.020
    assert statistics.median(times) < 0.020 + 0.010, times


def test_bandwidth_paces_a_transfer(serve):
    payload = os.urandom(200_000)
    with LinkRelay("127.0.0.1", serve(_Sink), uplink_mbps=8) as relay, _connect(relay.port) as sock:
        start = time.perf_counter()
        sock.sendall(len(payload).to_bytes(8, "big") + payload)
        assert sock.recv(1) == b"k"
        elapsed = time.perf_counter() - start
    assert 0.2 * 0.7 <= elapsed <= 0.2 * 1.3, elapsed  # 200 kB * 8 / 8 Mbit/s


def test_bytes_arrive_intact_both_ways(serve):
    payload = os.urandom(3_000_000)
    with (
        LinkRelay("127.0.0.1", serve(_Echo), rtt_ms=2, uplink_mbps=400, downlink_mbps=400) as relay,
        _connect(relay.port) as sock,
    ):
        sender = threading.Thread(target=sock.sendall, args=(payload,))  # send while the echo comes back
        sender.start()
        echoed = _recv_exactly(sock, len(payload))
        sender.join()
    assert echoed == payload


def test_loss_holds_a_chunk_one_rto(serve):
    with LinkRelay("127.0.0.1", serve(_Echo), loss=1.0) as relay, _connect(relay.port) as sock:
        elapsed = _round_trip(sock)
    assert elapsed >= 2 * RTO_S  # held once on the way out and once on the way back


def test_cli_refuses_bad_arguments_in_one_line():
    for bad in (["--target", "nowhere"], ["--target", "127.0.0.1:8000", "--loss", "2"]):
        result = subprocess.run(
            [sys.executable, "-m", "askexpert.deploy.relay", *bad], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the kernel's shaping, where this machine allows it -----------------------------------------------------

_NETNS_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("10.213.7.2", 9123)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); left = 200_000
while left:
    data = c.recv(65536)
    if not data: sys.exit(1)
    left -= len(data)
c.sendall(b"k")
"""
_NETNS_CLIENT = """
import socket, time
c = socket.create_connection(("10.213.7.2", 9123), timeout=4)
start = time.perf_counter(); c.sendall(bytes(200_000)); assert c.recv(1) == b"k"
print(time.perf_counter() - start)
"""


def test_kernel_tbf_shapes_a_veth_pair():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("`ip` or `tc` (iproute2) is not installed")
    tag = f"akr{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=5)

    server = None
    try:
        try:
            sh("ip", "netns", "add", a)
            sh("ip", "netns", "add", b)
            sh("ip", "link", "add", a, "netns", a, "type", "veth", "peer", "name", b, "netns", b)
            sh("ip", "-n", a, "addr", "add", "10.213.7.1/24", "dev", a)
            sh("ip", "-n", b, "addr", "add", "10.213.7.2/24", "dev", b)
            sh("ip", "-n", a, "link", "set", a, "up")
            sh("ip", "-n", b, "link", "set", b, "up")
            # a queue long enough (rate x latency) that nothing is dropped: the rate alone sets the time
            sh("tc", "-n", a, "qdisc", "add", "dev", a, "root", *"tbf rate 8mbit burst 16kb latency 1s".split())
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"cannot build a shaped veth pair here: {getattr(err, 'stderr', '') or err}".strip())
        in_ns = ["ip", "netns", "exec"]
        server = subprocess.Popen(
            [*in_ns, b, sys.executable, "-c", textwrap.dedent(_NETNS_SERVER)], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.run(
            [*in_ns, a, sys.executable, "-c", _NETNS_CLIENT], capture_output=True, text=True, timeout=5, check=True
        )
        mbps = 200_000 * 8 / float(client.stdout) / 1e6
        assert 8 * 0.7 <= mbps <= 8 * 1.3, mbps
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (a, b):  # deleting a namespace deletes its end of the veth pair (and the pair with it)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

"""SIGTERM under load: does the server's drain lose a request? (issue 27: 0 lost in 20 rounds of 16 clients)

    python benchmarks/drain_load.py --engine inline --rounds 20 --clients 16       # builds the tiny test export
    python benchmarks/drain_load.py --engine litserve --export EXPORT --rounds 20 --clients 16

Each round starts `python -m askexpert serve --export EXPORT --engine ENGINE` on a free port, lets `--clients`
clients send `POST /predict` back to back on kept-alive connections, sends SIGTERM to the server after a random
0.3-1.0 s of that, and follows every request to its end. A request is
- answered: a whole reply, 200, or 503 (refused before it was accepted; the reply closes the connection);
- not sent: its connection was refused, or the server had closed the kept-alive connection before the client
  sent on it (the client looks first, as HTTP clients do before reusing a connection);
- lost: sent, then the connection closed or was reset without a whole reply, or no reply in `--reply_timeout_s`.
The server must also exit 0 (a complete drain). Without `--export` the export is the test suite's tiny one
(micro ViTs, built here with tests/helpers, about a minute). Writes benchmarks/results/drain_load_<engine>.json
(or `--out`); exits 1 if a request was lost or a drain did not exit 0.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "benchmarks"):  # run as a plain script, or loaded by a test
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from server_process import wait_healthy  # noqa: E402 (beside this script)

HOST = "127.0.0.1"
DRAIN_LIMIT_S = 60  # a server still running this long after SIGTERM counts as a failed drain (and is killed)


def request_bytes(export: str) -> list[bytes]:
    """Whole HTTP requests, one per expert, with random images of the export's size."""
    import numpy as np

    from askexpert.deploy.bundle import load_bundle

    bundle = load_bundle(export)
    size = bundle.stored_size
    rng = np.random.default_rng(0)
    requests = []
    for expert in bundle.expert_names:
        image = rng.integers(0, 256, 3 * size * size, dtype=np.uint8).tobytes()
        body = json.dumps({"expert": expert, "image": base64.b64encode(image).decode()}).encode()
        head = f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        requests.append(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return requests


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this kept-alive connection (EOF or reset waiting), looked at without blocking."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # EOF, or a byte before any request: either way not a connection to reuse
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def read_reply(sock: socket.socket) -> tuple[int, bool]:
    """(status, whether the reply closes the connection) of one whole reply; ConnectionError if it is cut."""
    stream = sock.makefile("rb")
    try:
        status_line = stream.readline(65536)
        if not status_line.startswith(b"HTTP/1.1 "):
            raise ConnectionError(f"no reply (got {status_line[:40]!r})")
        status, length, closes = int(status_line.split()[1]), 0, False
        while (line := stream.readline(65536)) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"connection":
                closes = b"close" in value.lower()
        if line != b"\r\n" or len(stream.read(length)) != length:
            raise ConnectionError("the reply was cut")
        return status, closes
    finally:
        stream.close()


class Tally:
    """Counts shared by the client threads."""

    def __init__(self) -> None:
        self.counts, self.lost, self.lock = Counter(), [], threading.Lock()

    def add(self, key: str, how: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if how is not None:
                self.lost.append(how)


def client(port: int, requests: list[bytes], offset: int, tally: Tally, timeout_s: float, think_s: float, stop):
    """Requests on one kept-alive connection (a random pause of up to `think_s` between them: idle connections when
    SIGTERM comes), a new connection after a reply that closes; until a connection is refused."""
    sock, turn, pause = None, offset, random.Random(offset)
    while not stop.is_set():
        if think_s:
            time.sleep(pause.uniform(0, think_s))
        if sock is not None and closed_by_server(sock):
            sock.close()
            sock = None
            tally.add("closed_before_sent")
        if sock is None:
            try:
                sock = socket.create_connection((HOST, port), timeout=timeout_s)
            except OSError:
                tally.add("connections_refused")  # nothing was sent: the server has stopped accepting
                return
        try:
            sock.sendall(requests[turn % len(requests)])
            tally.add("sent")
            status, closes = read_reply(sock)
        except (OSError, ConnectionError, ValueError) as err:
            tally.add("lost", f"{type(err).__name__}: {err}")
            sock.close()
            sock = None
            continue
        tally.add(f"answered_{status}")
        turn += 1
        if closes:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run_round(export, engine, clients, requests, rng, timeout_s: float, think_s: float, log) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "askexpert", "serve", "--export", export, "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--engine", engine], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    tally, stop = Tally(), threading.Event()
    try:
        wait_healthy(server, f"http://{HOST}:{port}")
        threads = [
            threading.Thread(target=client, args=(port, requests, i, tally, timeout_s, think_s, stop), daemon=True)
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        load_s = rng.uniform(0.3, 1.0)
        time.sleep(load_s)
        sent_before = tally.counts["sent"]
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)  # the main process only (LitServe's drains its HTTP process itself)
        try:
            exit_status = server.wait(timeout=DRAIN_LIMIT_S)
        except subprocess.TimeoutExpired:
            exit_status = None
        drain_s = time.monotonic() - start
        for thread in threads:
            thread.join(timeout=timeout_s + 5)
    finally:
        stop.set()
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever is left of its process group (LitServe's workers)
        except ProcessLookupError:
            pass
        server.wait()
    return {
        "exit_status": exit_status,
        "drain_s": round(drain_s, 3),
        "load_before_sigterm_s": round(load_s, 3),
        "sent_before_sigterm": sent_before,
        "lost": 0,
        **dict(sorted(tally.counts.items())),
        "lost_how": sorted(set(tally.lost))[:10],
    }


def build_tiny_export(folder: Path) -> str:
    """The test suite's tiny export (tests/conftest.py's tiny_export): micro ViTs, one epoch, about a minute."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.pipelines import write_configs

    from askexpert.cli import cli_main

    config = write_configs(folder)
    cli_main(["pipeline", "--config", str(config), "--out", str(folder / "run")])
    cli_main(["export", "--run", str(folder / "run"), "--out", str(folder / "export")])
    return str(folder / "export")


def run(export: str, engine: str, rounds: int, clients: int, seed=0, timeout_s=30.0, think_ms=0.0) -> dict:
    """Every round's counts, and the totals; prints one line per round."""
    requests = request_bytes(export)
    rng = random.Random(seed)
    results = []
    with tempfile.NamedTemporaryFile("w+", prefix="drain_load_", suffix=".log") as log:
        for r in range(rounds):
            result = run_round(export, engine, clients, requests, rng, timeout_s, think_ms / 1000, log)
            results.append(result)
            answered = {k: v for k, v in result.items() if k.startswith("answered_")}
            print(
                f"round {r + 1}: exit {result['exit_status']} after {result['drain_s']:.2f} s; sent {result['sent']}, "
                f"{answered}, lost {result['lost']}, refused connections {result.get('connections_refused', 0)}",
                flush=True,
            )
            if result["exit_status"] is None:
                log.seek(0)
                print(log.read()[-3000:], file=sys.stderr)
    totals = Counter()
    for result in results:
        totals.update({k: v for k, v in result.items() if isinstance(v, int) and k != "exit_status"})
    clean_exits = sum(result["exit_status"] == 0 for result in results)
    return {
        "engine": engine,
        "rounds": rounds,
        "clients": clients,
        "think_ms": think_ms,
        "cpus": os.cpu_count(),
        "totals": dict(sorted(totals.items())),
        "clean_exits": clean_exits,
        "passed": totals["lost"] == 0 and clean_exits == rounds,
        "per_round": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", default="inline", choices=["inline", "litserve"], help="the server's --engine")
    p.add_argument("--export", default=None, help="export folder to serve (default: build the tiny test export)")
    p.add_argument("--rounds", type=int, default=20, help="server starts, each stopped by SIGTERM under load")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients, each on its kept-alive connection")
    p.add_argument("--reply_timeout_s", type=float, default=30.0, help="a sent request unanswered this long is lost")
    p.add_argument("--think_ms", type=float, default=0.0, help="each client pauses up to this long between requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the random load time before each SIGTERM")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/drain_load_<engine>.json)")
    args = p.parse_args()
    if args.rounds < 1 or args.clients < 1 or args.reply_timeout_s <= 0 or args.think_ms < 0:
        p.error("--rounds and --clients must be at least 1, --reply_timeout_s positive, --think_ms >= 0")
    with tempfile.TemporaryDirectory(prefix="drain_load_export_") as scratch:
        export = args.export or build_tiny_export(Path(scratch))
        results = run(export, args.engine, args.rounds, args.clients, args.seed, args.reply_timeout_s, args.think_ms)
    from askexpert.files.atomic import write_json

    out = args.out or str(ROOT / "benchmarks" / "results" / f"drain_load_{args.engine}.json")
    write_json(out, {"export": args.export or "tiny test export", **results})
    totals = results["totals"]
    print(
        f"{args.engine}: {results['rounds']} rounds x {args.clients} clients: sent {totals.get('sent', 0)}, "
        f"lost {totals.get('lost', 0)}, clean exits {results['clean_exits']}/{results['rounds']}: "
        f"{'PASS' if results['passed'] else 'FAIL'}; results written to {out}"
    )
    sys.exit(0 if results["passed"] else 1)


if __name__ == "__main__":
    main()

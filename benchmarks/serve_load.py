"""Load on the expert server: throughput and latency at a few levels of concurrency, and what batching achieved.

    python benchmarks/serve_load.py --export /tmp/export_demo                  # levels 1 4 16, 10 s each
    python benchmarks/serve_load.py --export EXPORT --engine litserve --out results.json
    python benchmarks/serve_load.py --export EXPORT --levels 1 16 --batch_window_ms 5

Starts `python -m askexpert serve --export EXPORT --engine ENGINE` itself (and stops its whole process group
at the end). For each level N, N clients each send `POST /predict` back to back (round-robin over the experts,
random uint8 images) for `--seconds`. Reported per level: requests/s, p50/p99 latency as the client sees it, and
the server's side from `/metrics` (mean batch size, mean model time per batch). The levels run `--rounds`
times, the bare model timed again before each round while the server idles, and the medians are reported: this
machine's speed drifts by more than the margins measured. Two goals, each PASS or MISS with its numbers:
- scaling: throughput at the most clients / throughput at 1 client >= 3;
- batch-1 overhead: p50 latency at 1 client - the model's own time for those requests (the server's
  expert_seconds) <= batch window + 2 ms. Also printed: the same over the bare model timed back to back here.
The clients share the machine with the server, so on a small CPU they take cycles from it; the load client is a
minimal keep-alive HTTP/1.1 client on asyncio streams (not httpx) to take as few as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from server_process import wait_healthy  # noqa: E402 (beside this script)

from askexpert.deploy.bundle import load_bundle  # noqa: E402
from askexpert.deploy.metrics import sample_sum  # noqa: E402
from askexpert.deploy.timing import percentiles, time_for  # noqa: E402
from askexpert.files.atomic import write_json  # noqa: E402

HOST = "127.0.0.1"
WARMUP_S = 1.0  # per level, not counted: connections open, the server's queues settle
IMAGES = 64  # distinct random images each client cycles through


def bare_model_ms(bundle, sessions: list, seconds: float = 2.0) -> float:
    """p50 ms of one expert call at batch 1 straight in ONNX Runtime, round-robin over the experts."""
    rng = np.random.default_rng(0)
    s = bundle.stored_size
    image = rng.integers(0, 256, (1, 3, s, s), dtype=np.uint8)
    for session in sessions:  # warm-up
        for _ in range(5):
            session.run(None, {"images": image})
    turns = itertools.cycle(sessions)
    return statistics.median(time_for(lambda: next(turns).run(None, {"images": image}), seconds)) * 1e3


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import httpx

    reply = httpx.get(f"http://{HOST}:{port}{path}", timeout=timeout, trust_env=False)
    return reply.status_code, reply.content


def start_server(args, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "askexpert", "serve", "--export", args.export, "--port", str(args.port)]
    command += ["--batch_window_ms", str(args.batch_window_ms), "--max_batch_size", str(args.max_batch_size)]
    command += ["--threads", str(args.threads), "--engine", args.engine, "--precision", args.precision]
    # its own session: the server's LitServe workers are stopped with it, by process group
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)  # drains, then stops its workers
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def server_view(before: str, after: str) -> dict:
    """Mean batch size, model ms per batch and in-server ms per request between two /metrics pages."""

    def mean(name, label=""):
        count = sample_sum(after, f"{name}_count", label) - sample_sum(before, f"{name}_count", label)
        total = sample_sum(after, f"{name}_sum", label) - sample_sum(before, f"{name}_sum", label)
        return total / count if count else 0.0

    return {
        "mean_batch": mean("askexpert_batch_size"),
        "model_ms_per_batch": mean("askexpert_expert_seconds") * 1e3,
        "server_ms_per_request": mean("askexpert_request_seconds", 'path="/predict"') * 1e3,
    }


async def client(port: int, bodies: list[bytes], offset: int, stop_at: float, counted_from: float, out: dict):
    """One client: back-to-back requests on one kept-alive connection; latencies of those sent after counted_from."""
    reader, writer = await asyncio.open_connection(HOST, port)
    loop = asyncio.get_running_loop()
    i = offset
    try:
        while (start := loop.time()) < stop_at:
            body = bodies[i % len(bodies)]
            i += 1
            head = f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("the server closed the connection")
            status = int(status_line.split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if start >= counted_from:
                out["latencies" if status == 200 else "errors"].append(loop.time() - start)
    finally:
        writer.close()


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    counted_from = loop.time() + WARMUP_S
    stop_at = counted_from + seconds
    out = {"latencies": [], "errors": []}
    step = max(1, len(bodies) // clients)  # clients start at different images (and experts)
    await asyncio.gather(*(client(port, bodies, k * step, stop_at, counted_from, out) for k in range(clients)))
    return out


def run_level(args, bodies: list[bytes], clients: int) -> dict:
    before = http_get(args.port, "/metrics")[1].decode()
    out = asyncio.run(load(args.port, bodies, clients, args.seconds))
    after = http_get(args.port, "/metrics")[1].decode()
    n = len(out["latencies"])
    latency_ms = (
        percentiles([1e3 * s for s in out["latencies"]], (50, 99)) if n else {"p50": float("nan"), "p99": float("nan")}
    )
    return {
        "clients": clients,
        "requests": n,
        "errors": len(out["errors"]),
        # each request counted is one that started in the window; they end up to one latency past it
        "throughput_rps": n / args.seconds,
        "p50_ms": latency_ms["p50"],
        "p99_ms": latency_ms["p99"],
        **server_view(before, after),
    }


def request_bodies(bundle) -> list[bytes]:
    """JSON bodies of random images, round-robin over the experts (built once: no client CPU in the loop)."""
    rng = np.random.default_rng(1)
    s = bundle.stored_size
    experts = bundle.expert_names
    return [
        json.dumps(
            {
                "expert": experts[i % len(experts)],
                "image": base64.b64encode(rng.integers(0, 256, (3, s, s), dtype=np.uint8).tobytes()).decode(),
            }
        ).encode()
        for i in range(IMAGES)
    ]


def median_levels(rounds: list[dict]) -> list[dict]:
    """Each level's figures as the median over the rounds."""
    return [
        {key: statistics.median(r["levels"][i][key] for r in rounds) for key in rounds[0]["levels"][i]}
        for i in range(len(rounds[0]["levels"]))
    ]


def report(args, rounds: list[dict]) -> dict:
    window, most = args.batch_window_ms, args.max_batch_size
    levels = median_levels(rounds)
    print(
        f"\nexpert server load ({args.engine}, {args.precision}): {args.export}, batch window {window:g} ms, "
        f"max batch {most}"
    )
    print(
        f"{os.cpu_count()} CPU cores shared by the server and the clients; {args.seconds:g} s per level, "
        f"medians of {len(rounds)} rounds\n"
    )
    print("| clients | req/s | p50 ms | p99 ms | errors | mean batch | model ms/batch | in-server ms/req |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in levels:
        print(
            f"| {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:g} | "
            f"{r['mean_batch']:.2f} | {r['model_ms_per_batch']:.2f} | {r['server_ms_per_request']:.2f} |"
        )
    ratios = [r["levels"][-1]["throughput_rps"] / r["levels"][0]["throughput_rps"] for r in rounds]
    ratio = statistics.median(ratios)
    scaling_ok = ratio >= 3.0
    low, high = levels[0]["clients"], levels[-1]["clients"]
    print(
        f"\nscaling: throughput({high}) / throughput({low}) per round = {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"median {ratio:.2f}x (goal >= 3x): {'PASS' if scaling_ok else 'MISS'}"
    )
    verdict = {"scaling_ratio": ratio, "scaling_pass": scaling_ok}
    if low == 1:
        goal = window + 2.0
        bare = ", ".join(f"{r['bare_model_p50_ms']:.2f}" for r in rounds)
        # Two baselines for the model's own time. Hot: the bare model back to back in this process (an unpaired
        # estimate). In server: the same requests' model time, from the server's expert_seconds (ONNX Runtime's
        # run only); at 1 client the model runs after an idle gap (the window) and this machine runs it slower
        # then, which is not the server's doing.
        hot = [r["levels"][0]["p50_ms"] - r["bare_model_p50_ms"] for r in rounds]
        paired = [r["levels"][0]["p50_ms"] - r["levels"][0]["model_ms_per_batch"] for r in rounds]
        print(f"bare model p50 at batch 1, back to back in this process, timed in each round: {bare} ms")
        for name, values in (("over the hot bare model", hot), ("over the same requests' model time", paired)):
            print(
                f"batch-1 overhead {name}: per round {', '.join(f'{x:.2f}' for x in values)} ms; median "
                f"{statistics.median(values):.2f} ms (goal <= window {window:g} + 2 = {goal:g} ms): "
                f"{'PASS' if statistics.median(values) <= goal else 'MISS'}"
            )
        overhead = statistics.median(paired)
        verdict.update(
            batch1_overhead_ms=overhead,
            batch1_overhead_pass=overhead <= goal,
            batch1_overhead_over_hot_bare_ms=statistics.median(hot),
        )
    else:
        print("batch-1 overhead: not measured (the levels do not start at 1 client)")
    return verdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="export folder to serve")
    p.add_argument("--port", type=int, default=8765, help="port for the server (1024-65535)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per level and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (bare model, every level); medians reported")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="numbers of concurrent clients")
    p.add_argument("--batch_window_ms", type=float, default=2.0, help="the server's --batch_window_ms")
    p.add_argument("--max_batch_size", type=int, default=16, help="the server's --max_batch_size")
    p.add_argument("--engine", default="inline", choices=["inline", "litserve"], help="the server's --engine")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model (server and bare timing)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="the server's --precision")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if not 1024 <= args.port <= 65535 or args.seconds <= 0 or min(args.levels) < 1 or args.rounds < 1:
        p.error("--port must be 1024-65535, --seconds positive, --rounds and every level at least 1")
    args.levels = sorted(set(args.levels))
    bundle = load_bundle(args.export)
    sessions = [bundle.session(name, args.threads, precision=args.precision) for name in bundle.expert_names]
    bodies = request_bodies(bundle)
    with tempfile.NamedTemporaryFile("w+", prefix="serve_load_", suffix=".log") as log:
        server = start_server(args, log)
        try:
            try:
                wait_healthy(server, f"http://{HOST}:{args.port}")
            except RuntimeError as err:
                log.seek(0)
                sys.exit(f"serve_load: {err}\n{log.read()[-2000:]}")
            rounds = []
            for r in range(args.rounds):
                # the bare model is timed in each round, while the server idles: the machine's speed drifts
                bare_ms = bare_model_ms(bundle, sessions)
                levels = [run_level(args, bodies, clients) for clients in args.levels]
                rounds.append({"bare_model_p50_ms": bare_ms, "levels": levels})
                summary = ", ".join(f"{x['clients']}: {x['throughput_rps']:.1f} req/s" for x in levels)
                print(f"round {r + 1}: bare model {bare_ms:.2f} ms; {summary}", flush=True)
        finally:
            stop_server(server)
    verdict = report(args, rounds)
    if args.out:
        results = {"settings": vars(args), "rounds": rounds, **verdict}
        write_json(args.out, results)
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()

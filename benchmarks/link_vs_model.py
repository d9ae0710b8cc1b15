"""Measured end-to-end latency on emulated links vs the cost model's prediction for the same images.

    python benchmarks/link_vs_model.py --export /tmp/export_demo --images /tmp/edge_imgs        # ~1-2 min
    python benchmarks/link_vs_model.py --export EXPORT --images DIR --links wifi:3.7:25 lte:19.9:6 --out r.json

Steps:
1. Compute times of this machine at batch 1: `python -m askexpert profile` (PyTorch, run in this process with one
   torch thread) for the export's models, and each ONNX file straight in ONNX Runtime (one intra-op thread, as
   the server's `--threads 1` and `edge --threads 1`; median of RUNS after WARMUP). Both are reported; the
   prediction uses the ONNX Runtime times (written under the profile's `measured_ms` keys), because ONNX
   Runtime is what `edge` and `serve` actually run.
2. One `python -m askexpert serve --threads 1` for the whole benchmark (its process group is killed at the end),
   and a reference `edge --concurrency 1` run straight to it (loopback, no relay).
3. Per link NAME:RTT_MS:UPLINK_MBPS: a `LinkRelay` with that round trip and uplink (downlink unlimited, as the
   cost model has no downlink term) in front of the server, and `edge --concurrency 1` through it on the images.
4. Per image, the cost model's latency (askexpert/collab/costs.py) with that profile and the link's figures:
   generalist on the edge + [offloaded] * (transfer + rtt + expert). Two variants of the bytes sent: what the
   profile says (by default the raw uint8 image, C*H*W), and the JSON+base64 body the client actually sends.
5. Per link: mean and p50 measured vs predicted for offloaded and for edge-only images, the ratio, and PASS/MISS
   (within TOLERANCE; a miss is printed as one). From `/metrics` deltas: the time inside the server per request
   and how much of it is model time; the rest is serving overhead (LitServe's process hand-offs, batch window,
   JSON/base64), which the cost model does not model. The offloaded mean's gap to the prediction is then split
   into that overhead (from the direct run, whose server clock holds no emulated transfer), the model running
   slower in the server than alone, the edge's own per-offload work (gate, base64, HTTP client; from the direct
   run) and the rest (mostly the relay: its ~1 ms timers, its thread in this process).

Both ends share this machine (edge, relay and server on 2 cores here), so the edge's compute competes with the
server's; on real hardware they are separate devices.
"""

from __future__ import annotations

import argparse
import base64
import copy
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from askexpert.cli import cli_main  # noqa: E402
from askexpert.collab.costs import CostModel, measured_key, model_cost, profile_from_dict  # noqa: E402
from askexpert.deploy.bundle import load_bundle  # noqa: E402
from askexpert.deploy.relay import LinkRelay  # noqa: E402

HOST = "127.0.0.1"
DEFAULT_LINKS = ["wifi:3.7:25", "lte:19.9:6"]  # rtt and uplink of configs/profiles/pi4_wifi_orin.yaml, pi4_lte_orin
BASE_PROFILE = ROOT / "configs" / "profiles" / "pi4_wifi_orin.yaml"  # powers etc.; only link and times replaced
TOLERANCE = 0.20  # |measured / predicted - 1| within this: PASS
WARMUP, RUNS = 20, 200  # ONNX Runtime timing per model
SERVER_WARMUP_REQUESTS = 3  # per expert, straight to the server before any link: its first-call costs paid


def parse_link(text: str) -> tuple[str, float, float]:
    try:
        name, rtt, uplink = text.split(":")
        return name, float(rtt), float(uplink)
    except ValueError:
        raise SystemExit(f"--links {text!r}: give NAME:RTT_MS:UPLINK_MBPS, e.g. wifi:3.7:25") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def export_models(bundle) -> dict[str, tuple[str, int, int]]:
    """Each model of the export: (timm name, outputs, the input side it computes at)."""
    return {
        name: (m["model_name"], int(m["output"]["shape"][-1]), int(m.get("model_image_size") or bundle.stored_size))
        for name, m in bundle.manifest["models"].items()
    }


def torch_times(models: dict, folder: str) -> dict[str, float]:
    """measured_key -> ms from the `profile` command (PyTorch), one call per distinct head width / input side."""
    out = os.path.join(folder, "torch_profile.yaml")
    base = str(BASE_PROFILE)
    for model_name, width, size in sorted(set(models.values())):
        argv = ["profile", "--models", model_name, "--num_classes", str(width), "--image_size", str(size)]
        cli_main([*argv, "--role", "both", "--base_profile", base, "--out", out])
        base = out  # the next call adds its time to this file (profile keeps this machine's earlier times)
    with open(out, encoding="utf-8") as f:
        return dict(yaml.safe_load(f)["edge"]["measured_ms"])


def onnx_ms(bundle, name: str) -> float:
    """Median ms of one batch-1 call of the model's ONNX file in ONNX Runtime with one intra-op thread."""
    session = bundle.session(name, threads=1)
    s = bundle.stored_size
    image = np.random.default_rng(0).integers(0, 256, (1, 3, s, s), dtype=np.uint8)
    for _ in range(WARMUP):
        session.run(None, {"images": image})
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session.run(None, {"images": image})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def request_body_bytes(bundle) -> int:
    """Size of the JSON+base64 body the edge client sends for one image (built as ExpertClient.ask builds it)."""
    s = bundle.stored_size
    image = base64.b64encode(bytes(3 * s * s)).decode("ascii")  # base64 length does not depend on the content
    return len(
        httpx.Request("POST", "http://x/predict", json={"expert": bundle.expert_names[0], "image": image}).content
    )


# ---- the server ------------------------------------------------------------------------------------------------
def wait_healthy(server: subprocess.Popen, port: int, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {limit_s:g} s")


def metrics_page(port: int) -> str:
    # straight to the server, not through a relay: reading the metrics must not use the emulated link
    return httpx.get(f"http://{HOST}:{port}/metrics", timeout=5.0, trust_env=False).text


def metric(text: str, name: str, label: str = "") -> float:
    """One Prometheus sample summed over its label sets (or those containing `label`)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " ")) and label in line
    )


def server_split(before: str, after: str) -> dict:
    """Per /predict request between two /metrics pages: time in the server, of which model time."""
    path = 'path="/predict"'
    requests = metric(after, "askexpert_request_seconds_count", path) - metric(
        before, "askexpert_request_seconds_count", path
    )
    in_server = metric(after, "askexpert_request_seconds_sum", path) - metric(
        before, "askexpert_request_seconds_sum", path
    )
    model = metric(after, "askexpert_expert_seconds_sum") - metric(before, "askexpert_expert_seconds_sum")
    batches = metric(after, "askexpert_expert_seconds_count") - metric(before, "askexpert_expert_seconds_count")
    per = 1e3 / requests if requests else float("nan")
    return {
        "requests": int(requests),
        "mean_batch": requests / batches if batches else float("nan"),
        "in_server_ms": in_server * per,
        "model_ms": model * per,  # a batch's model time shared by its requests (batch 1 at concurrency 1)
        "overhead_ms": (in_server - model) * per,
    }


def warm_server(port: int, bundle) -> None:
    s = bundle.stored_size
    image = base64.b64encode(bytes(3 * s * s)).decode("ascii")
    with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10.0, trust_env=False) as client:
        for expert in bundle.expert_names:
            for _ in range(SERVER_WARMUP_REQUESTS):
                client.post("/predict", json={"expert": expert, "image": image}).raise_for_status()


# ---- prediction and comparison ---------------------------------------------------------------------------------
def cost_model(base: dict, link: tuple[str, float, float], measured: dict, image_bytes, stored: int) -> CostModel:
    """The base profile with this machine's ONNX Runtime times on both devices and the emulated link's figures."""
    raw = copy.deepcopy(base)
    name, rtt, uplink = link
    raw["link"].update(name=f"emulated {name}", rtt_ms=rtt, uplink_mbps=uplink)
    for role in ("edge", "near_edge"):
        raw[role]["measured_ms"] = dict(measured)
    if image_bytes is not None:
        raw["image_bytes"] = image_bytes
    return CostModel(profile_from_dict(raw), (3, stored, stored))


def predicted_ms(model: CostModel, models: dict, row: dict) -> float:
    edge = model.on_edge(model_cost(model.profile, *models["generalist"])).latency_ms
    if not row["offloaded"]:
        return edge
    return edge + model.offload(model_cost(model.profile, *models[f"expert_{row['expert']}"])).latency_ms


def compare(measured: list[float], predicted: list[float]) -> dict:
    if not measured:
        return {"images": 0}
    out = {"images": len(measured)}
    for stat, f in (("mean", statistics.fmean), ("p50", statistics.median)):
        m, p = f(measured), f(predicted)
        out[stat] = {"measured_ms": m, "predicted_ms": p, "ratio": m / p, "pass": abs(m / p - 1) <= TOLERANCE}
    return out


def read_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        {
            "latency_ms": float(r["latency_ms"]),
            "offloaded": r["offloaded"] == "True",
            "fallback": r["fallback"] == "True",
            "expert": r["expert"],
        }
        for r in rows
    ]


def run_edge(args, url: str, tag: str, folder: str) -> tuple[list[dict], dict, dict]:
    """`edge --concurrency 1` against `url`: its rows (the first one left out), its summary, the server's split."""
    out_csv = os.path.join(folder, f"edge_{tag}.csv")
    before = metrics_page(args.port)
    argv = ["edge", "--export", args.export, "--server", url, "--images", args.images, "--out", out_csv]
    summary = cli_main([*argv, "--concurrency", "1", "--threads", "1"])
    after = metrics_page(args.port)
    rows = read_rows(out_csv)[1:]  # the first image pays the edge session's first call: not counted
    return rows, summary, server_split(before, after)


def run_direct(args, folder: str) -> dict:
    """Reference without a relay (loopback): the server's overhead with no emulated transfer inside its clock,
    and what the edge spends per offloaded image outside the generalist and the server."""
    rows, summary, server = run_edge(args, f"http://{HOST}:{args.port}", "direct", folder)
    offloaded = [r["latency_ms"] for r in rows if r["offloaded"] and not r["fallback"]]
    measured = statistics.fmean(offloaded) if offloaded else float("nan")
    generalist = args.measured[args.generalist_key]
    return {
        "edge_summary": summary,
        "server": server,
        "offloaded_images": len(offloaded),
        "offloaded_mean_ms": measured,
        # gate, base64/JSON, the HTTP client and loopback, the server's parsing before its clock starts
        "edge_side_ms": measured - server["in_server_ms"] - generalist,
    }


def run_link(args, link, bundle, models, variants: dict, folder: str) -> dict:
    name, rtt, uplink = link
    with LinkRelay(HOST, args.port, rtt_ms=rtt, uplink_mbps=uplink) as relay:
        rows, summary, server = run_edge(args, f"http://{HOST}:{relay.port}", name, folder)
    result = {"link": {"name": name, "rtt_ms": rtt, "uplink_mbps": uplink}, "edge_summary": summary}
    result["fallbacks"] = sum(r["fallback"] for r in rows)
    groups = {
        "offloaded": [r for r in rows if r["offloaded"] and not r["fallback"]],  # a fallback got no expert answer
        "edge_only": [r for r in rows if not r["offloaded"]],
    }
    for group, members in groups.items():
        measured = [r["latency_ms"] for r in members]
        result[group] = {}
        for variant, (_, image_bytes) in variants.items():
            model = cost_model(args.base, link, args.measured, image_bytes, bundle.stored_size)
            result[group][variant] = compare(measured, [predicted_ms(model, models, r) for r in members])
    result["server"] = server
    return result


def explain(result: dict, direct: dict, expert_alone_ms: float) -> dict | None:
    """The offloaded mean's gap (measured - predicted B) split into what the cost model leaves out."""
    b = result["offloaded"]["wire"]
    if not b["images"]:
        return None
    gap = b["mean"]["measured_ms"] - b["mean"]["predicted_ms"]
    parts = {
        "gap_ms": gap,
        "serving_overhead_ms": direct["server"]["overhead_ms"],  # from the direct run: no transfer inside it
        "model_slower_in_server_ms": result["server"]["model_ms"] - expert_alone_ms,  # sharing 2 cores with the edge
        "edge_side_ms": direct["edge_side_ms"],
    }
    # what is left: mostly the relay (timers of ~1 ms granularity per direction, its thread in the edge's process)
    parts["rest_ms"] = gap - sum(v for k, v in parts.items() if k != "gap_ms")
    return parts


# ---- report ----------------------------------------------------------------------------------------------------
def verdict(c: dict, stat: str) -> tuple[str, str, str]:
    if c["images"] == 0:
        return "n/a", "n/a", "n/a (no image)"
    s = c[stat]
    return f"{s['predicted_ms']:.2f}", f"{s['ratio']:.2f}", "PASS" if s["pass"] else "**MISS**"


def report(args, results: list[dict], direct: dict, times: dict, variants: dict, expert_alone_ms: float) -> None:
    print(f"\n## Measured vs cost model: {args.export}, {args.images}\n")
    print("Compute times at batch 1 on this machine; the prediction uses ONNX Runtime's (what edge and serve run):\n")
    print("| model | key | PyTorch ms (`profile`, 1 torch thread) | ONNX Runtime ms (1 thread, median) |")
    print("|---|---|---:|---:|")
    for name, t in times.items():
        torch_ms = f"{t['torch_ms']:.3f}" if t["torch_ms"] is not None else "n/a"
        print(f"| {name} | {t['key']} | {torch_ms} | {t['onnx_ms']:.3f} |")
    (raw_label, _), (wire_label, _) = variants.values()
    print(f"\nPredicted A: {raw_label}. Predicted B: {wire_label}. PASS: within {TOLERANCE:.0%} of the prediction.")
    print("First image of each run not counted (the edge session's first call).\n")
    print("| link | images | statistic | measured ms | predicted A ms | ratio A | A | predicted B ms | ratio B | B |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---|")
    for r in results:
        link = r["link"]
        label = f"{link['name']} ({link['rtt_ms']:g} ms, {link['uplink_mbps']:g} Mbit/s)"
        for group in ("offloaded", "edge_only"):
            a, b = r[group]["raw"], r[group]["wire"]
            for stat in ("mean", "p50"):
                measured = f"{a[stat]['measured_ms']:.2f}" if a["images"] else "n/a"
                cells = [label, f"{group.replace('_', '-')} ({a['images']})", stat, measured]
                print("| " + " | ".join([*cells, *verdict(a, stat), *verdict(b, stat)]) + " |")
    print("\nInside the server, per /predict request (/metrics deltas over each run). Its clock starts at the request")
    print("headers; the relay delivers headers and body as one chunk or as two, so through a link part of the")
    print("emulated body transfer falls inside it. The direct run (loopback, no relay) gives the clean overhead.\n")
    print("| run | requests | mean batch | in server ms | of which model ms | in server − model ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in [("direct (no relay)", direct["server"]), *[(r["link"]["name"], r["server"]) for r in results]]:
        print(
            f"| {name} | {s['requests']} | {s['mean_batch']:.2f} | {s['in_server_ms']:.2f} | {s['model_ms']:.2f} | "
            f"{s['overhead_ms']:.2f} |"
        )
    print(f"\nWhere the offloaded mean's gap to predicted B goes (model alone: {expert_alone_ms:.2f} ms, the experts'")
    print("median in ONNX Runtime; edge side: direct run's offloaded mean − its in-server time − the generalist):\n")
    print("| link | gap ms | serving overhead ms | model slower in server ms | edge side ms | rest (relay, noise) ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        e = r["explained"]
        if e is None:
            print(f"| {r['link']['name']} | n/a (no offloaded image) | | | | |")
            continue
        print(
            f"| {r['link']['name']} | {e['gap_ms']:.2f} | {e['serving_overhead_ms']:.2f} | "
            f"{e['model_slower_in_server_ms']:.2f} | {e['edge_side_ms']:.2f} | {e['rest_ms']:.2f} |"
        )
    fallbacks = sum(r["fallbacks"] for r in results)
    if fallbacks:
        print(f"\n{fallbacks} offloaded image(s) fell back to the generalist (no expert answer): not counted above.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="export folder (served, and its generalist run on the edge)")
    p.add_argument("--images", required=True, help="folder of images for `edge`")
    p.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    p.add_argument("--links", nargs="+", default=DEFAULT_LINKS, help="NAME:RTT_MS:UPLINK_MBPS per emulated link")
    p.add_argument("--threads", type=int, default=1, help="the server's ONNX Runtime threads")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    links = [parse_link(text) for text in args.links]
    args.port = args.port or free_port()
    # one torch thread: the PyTorch times compare with ONNX Runtime's one thread, and the edge's own torch ops
    # (softmax, gate) do not fight the server for the 2 cores
    torch.set_num_threads(1)
    bundle = load_bundle(args.export)
    models = export_models(bundle)
    with open(BASE_PROFILE, encoding="utf-8") as f:
        args.base = yaml.safe_load(f)
    profile_bytes = args.base.get("image_bytes")
    raw_bytes = profile_bytes or 3 * bundle.stored_size**2
    body_bytes = request_body_bytes(bundle)
    variants = {
        "raw": (f"image_bytes from the profile ({raw_bytes:g} B{'' if profile_bytes else ', the raw uint8 image'})",
                None),
        "wire": (f"the JSON+base64 request body ({body_bytes} B, headers not counted)", body_bytes),
    }  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="link_vs_model_") as folder:
        torch_ms = torch_times(models, folder)  # before the server starts: nothing else of ours runs
        times = {}
        for name, entry in models.items():
            key = measured_key(*entry)
            times[name] = {"key": key, "torch_ms": torch_ms.get(key), "onnx_ms": onnx_ms(bundle, name)}
        # experts of one architecture share a key: the profile gets the median of their ONNX Runtime times
        args.measured = {
            key: statistics.median(t["onnx_ms"] for t in times.values() if t["key"] == key)
            for key in {t["key"] for t in times.values()}
        }
        args.generalist_key = times["generalist"]["key"]
        log = open(os.path.join(folder, "serve.log"), "w+")  # the server's output, shown if it fails to start
        command = [sys.executable, "-m", "askexpert", "serve", "--export", args.export, "--port", str(args.port)]
        server = subprocess.Popen(
            [*command, "--threads", str(args.threads)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: LitServe's workers die with it
        )
        try:
            try:
                wait_healthy(server, args.port)
            except RuntimeError as err:
                log.seek(0)
                raise SystemExit(f"link_vs_model: {err}\n{log.read()[-2000:]}") from None
            warm_server(args.port, bundle)
            direct = run_direct(args, folder)
            results = [run_link(args, link, bundle, models, variants, folder) for link in links]
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.wait()
            log.close()
    expert_alone_ms = statistics.median(t["onnx_ms"] for name, t in times.items() if name != "generalist")
    for r in results:
        r["explained"] = explain(r, direct, expert_alone_ms)
    report(args, results, direct, times, variants, expert_alone_ms)
    if args.out:
        document = {
            "export": args.export,
            "images": args.images,
            "server_threads": args.threads,
            "base_profile": str(BASE_PROFILE),
            "prediction_times": "ONNX Runtime, 1 intra-op thread, batch 1 (what edge and serve run)",
            "compute_times": times,
            "measured_ms_used": args.measured,
            "variants": {k: {"label": label, "image_bytes": b} for k, (label, b) in variants.items()},
            "tolerance": TOLERANCE,
            "cpu_count": os.cpu_count(),
            "direct": direct,
            "expert_alone_ms": expert_alone_ms,
            "links": results,
        }
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()

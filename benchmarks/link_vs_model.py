"""Measured end-to-end latency on emulated links vs the cost model's prediction for the same images.

    python benchmarks/link_vs_model.py --export /tmp/export_demo --images /tmp/edge_imgs        # ~1-2 min
    python benchmarks/link_vs_model.py --export EXPORT --images DIR --links wifi:3.7:25 lte:19.9:6:0.01 --out r.json

Steps:
1. Compute times of this machine at batch 1: `python -m askexpert profile` (PyTorch, run in this process with one
   torch thread) for the export's models, and each ONNX file straight in ONNX Runtime (one intra-op thread, as
   the server's `--threads 1` and `edge --threads 1`; median of RUNS after WARMUP). Both are reported; the
   prediction uses the ONNX Runtime times (written under the profile's `measured_ms` keys), because ONNX
   Runtime is what `edge` and `serve` actually run.
2. One `python -m askexpert serve --threads 1` for the whole benchmark (its process group is killed at the end),
   and a reference `edge --concurrency 1` run straight to it (loopback, no relay).
3. Calibration on that direct run: the cost model's per-request `link.overhead_ms` (serialisation, HTTP, the
   server's hand-offs; costs.py) is the mean over its offloaded images of measured latency - generalist -
   expert, with the compute times of the same profile the prediction uses. Nothing from the links goes into it,
   so the links below are an out-of-sample check of it.
4. Per link NAME:RTT_MS:UPLINK_MBPS[:LOSS]: `python -m askexpert.deploy.relay` in its own process (not a thread
   of this one: no GIL shared with the edge) with that round trip, uplink and loss (downlink unlimited, as the
   cost model has no downlink term) in front of the server, and `edge --concurrency 1` through it.
5. Per image, the cost model's latency (askexpert/collab/costs.py, the profile written as YAML and read back
   with `load_profile`): generalist on the edge + [offloaded] * (transfer + rtt + overhead_ms + expert), with
   (a) overhead_ms 0, as in the shipped profiles ("pure"), and (b) the calibrated overhead_ms. The bytes sent
   are the JSON+base64 body the client actually sends (primary) or the raw uint8 image, C*H*W (one line).
6. Per link: mean and p50 measured vs predicted for offloaded images, the ratio, and PASS/MISS (within
   TOLERANCE; a miss is printed as one). A group of fewer than MIN_VERDICT_IMAGES images (typically the
   edge-only ones) gets one line and no verdict. A link with loss gets no verdict either: the cost model has no
   loss term; the images that hit the relay's 200 ms hold are counted instead. From `/metrics` deltas: the time
   inside the server per request and how much of it is model time. The offloaded mean's gap to the pure
   prediction is split into the serving overhead (from the direct run), the model running slower in the server
   than alone, the edge's own per-offload work (direct run) and the rest (the relay process, noise).

Both ends share this machine (edge, relay and server on 2 cores here), so the edge's compute competes with the
server's; on real hardware they are separate devices.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import csv
import os
import re
import select
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
from server_process import wait_healthy  # noqa: E402 (beside this script)

from askexpert.cli import cli_main  # noqa: E402
from askexpert.collab.costs import CostModel, load_profile, measured_key, model_cost  # noqa: E402
from askexpert.deploy.bundle import load_bundle  # noqa: E402
from askexpert.deploy.metrics import sample_sum  # noqa: E402
from askexpert.deploy.relay import RTO_S  # noqa: E402
from askexpert.deploy.timing import time_calls  # noqa: E402
from askexpert.files.atomic import write_json  # noqa: E402

HOST = "127.0.0.1"
# rtt and uplink of configs/profiles/pi4_wifi_orin.yaml and pi4_lte_orin.yaml; the last one with 1 % loss
DEFAULT_LINKS = ["wifi:3.7:25", "lte:19.9:6", "lte-loss:19.9:6:0.01"]
BASE_PROFILE = ROOT / "configs" / "profiles" / "pi4_wifi_orin.yaml"  # powers etc.; only link and times replaced
TOLERANCE = 0.20  # |measured / predicted - 1| within this: PASS
MIN_VERDICT_IMAGES = 20  # a group with fewer images gets no PASS/MISS (one line instead)
WARMUP, RUNS = 20, 200  # ONNX Runtime timing per model
SERVER_WARMUP_REQUESTS = 3  # per expert, straight to the server before any link: its first-call costs paid
LOOPBACK_MBPS = 1e6  # the direct run's link in the calibration profile: transfer ~0 (uplink must be positive)
RELAY_START_S = 30.0


def parse_link(text: str) -> tuple[str, float, float, float]:
    """NAME:RTT_MS:UPLINK_MBPS[:LOSS] -> (name, rtt, uplink, loss)."""
    parts = text.split(":")
    try:
        if len(parts) not in (3, 4) or not parts[0]:
            raise ValueError
        rtt, uplink = float(parts[1]), float(parts[2])
        loss = float(parts[3]) if len(parts) == 4 else 0.0
        if rtt < 0 or uplink <= 0 or not 0.0 <= loss <= 1.0:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--links {text!r}: give NAME:RTT_MS:UPLINK_MBPS[:LOSS] (rtt >= 0, uplink > 0, loss in [0, 1]), "
            "e.g. wifi:3.7:25 or lte-loss:19.9:6:0.01"
        ) from None
    return parts[0], rtt, uplink, loss


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
    times = time_calls(lambda: session.run(None, {"images": image}), RUNS, warmups=WARMUP)
    return statistics.median(times) * 1e3


def request_body_bytes(bundle) -> int:
    """Size of the JSON+base64 body the edge client sends for one image (built as ExpertClient.ask builds it)."""
    s = bundle.stored_size
    image = base64.b64encode(bytes(3 * s * s)).decode("ascii")  # base64 length does not depend on the content
    return len(
        httpx.Request("POST", "http://x/predict", json={"expert": bundle.expert_names[0], "image": image}).content
    )


# ---- the server ------------------------------------------------------------------------------------------------
def metrics_page(port: int) -> str:
    # straight to the server, not through a relay: reading the metrics must not use the emulated link
    return httpx.get(f"http://{HOST}:{port}/metrics", timeout=5.0, trust_env=False).text


def server_split(before: str, after: str) -> dict:
    """Per /predict request between two /metrics pages: time in the server, of which model time."""
    path = 'path="/predict"'
    requests = sample_sum(after, "askexpert_request_seconds_count", path) - sample_sum(
        before, "askexpert_request_seconds_count", path
    )
    in_server = sample_sum(after, "askexpert_request_seconds_sum", path) - sample_sum(
        before, "askexpert_request_seconds_sum", path
    )
    model = sample_sum(after, "askexpert_expert_seconds_sum") - sample_sum(before, "askexpert_expert_seconds_sum")
    batches = sample_sum(after, "askexpert_expert_seconds_count") - sample_sum(before, "askexpert_expert_seconds_count")
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


# ---- the relay -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def relay_process(link: tuple[str, float, float, float], server_port: int, folder: str):
    """`python -m askexpert.deploy.relay` for this link in its own process (and process group, killed on exit);
    yields the port it listens on, once it has said so."""
    name, rtt, uplink, loss = link
    command = [sys.executable, "-m", "askexpert.deploy.relay", "--target", f"{HOST}:{server_port}"]
    command += ["--listen-port", str(free_port()), "--rtt_ms", repr(rtt), "--uplink_mbps", repr(uplink)]
    command += ["--loss", repr(loss)]
    log = open(os.path.join(folder, f"relay_{name}.log"), "w+")  # its stderr, shown if it fails to start
    relay = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        line, deadline = "", time.monotonic() + RELAY_START_S
        while not line:  # it prints one line once its port is open
            if relay.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                why = (
                    f"exited with status {relay.returncode}"
                    if relay.returncode is not None
                    else f"said nothing within {RELAY_START_S:g} s"
                )
                raise SystemExit(f"link_vs_model: the relay for {name} {why}\n{log.read()[-2000:]}")
            if select.select([relay.stdout], [], [], 0.2)[0]:
                line = relay.stdout.readline()
                if not line:  # end of its output: it is exiting, the next poll() says how
                    time.sleep(0.05)
        found = re.search(r"listening on [^\s]+:(\d+) ", line)
        if not found:
            raise SystemExit(f"link_vs_model: the relay for {name} printed {line.strip()!r}, not its port")
        yield int(found.group(1))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(relay.pid, signal.SIGTERM)
        try:
            relay.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(relay.pid, signal.SIGKILL)
            relay.wait()
        relay.stdout.close()
        log.close()


# ---- prediction and comparison ---------------------------------------------------------------------------------
def cost_model(args, tag: str, link_fields: dict, bytes_variant: str) -> CostModel:
    """The base profile with this machine's ONNX Runtime times on both devices and these link fields, written as
    a profile YAML and read back with `load_profile` (the cost model's own checks and defaults apply)."""
    raw = copy.deepcopy(args.base)
    raw["name"] = f"link_vs_model_{tag}"
    raw["link"].update(link_fields)
    for role in ("edge", "near_edge"):
        raw[role]["measured_ms"] = dict(args.measured)
    if args.image_bytes[bytes_variant] is not None:
        raw["image_bytes"] = args.image_bytes[bytes_variant]
    path = os.path.join(args.folder, f"profile_{tag}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return CostModel(load_profile(path), (3, args.stored, args.stored))


def link_cost_model(args, link, bytes_variant: str, overhead_variant: str) -> CostModel:
    name, rtt, uplink, _ = link
    fields = {"name": f"emulated {name}", "rtt_ms": rtt, "uplink_mbps": uplink}
    if overhead_variant == "calibrated":  # "pure": no overhead_ms at all, as in the shipped profiles (0)
        fields["overhead_ms"] = args.overhead_ms
    return cost_model(args, f"{name}_{bytes_variant}_{overhead_variant}", fields, bytes_variant)


def predicted_ms(model: CostModel, models: dict, row: dict) -> float:
    edge = model.on_edge(model_cost(model.profile, *models["generalist"])).latency_ms
    if not row["offloaded"]:
        return edge
    return edge + model.offload(model_cost(model.profile, *models[f"expert_{row['expert']}"])).latency_ms


def compare(measured: list[float], predicted: list[float], judged: bool) -> dict:
    """Mean and p50, measured vs predicted; `pass` is None where no verdict is given."""
    if not measured:
        return {"images": 0}
    out = {"images": len(measured)}
    for stat, f in (("mean", statistics.fmean), ("p50", statistics.median)):
        m, p = f(measured), f(predicted)
        passed = abs(m / p - 1) <= TOLERANCE if judged else None
        out[stat] = {"measured_ms": m, "predicted_ms": p, "ratio": m / p, "pass": passed}
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


def run_direct(args, models: dict, folder: str) -> dict:
    """Reference without a relay (loopback): the server's overhead with no emulated transfer inside its clock,
    what the edge spends per offloaded image outside the generalist and the server, and the calibration of the
    cost model's overhead_ms: mean over the offloaded images of measured - generalist - expert, the compute
    times from the profile the predictions use (here with a loopback link: no rtt, transfer ~0)."""
    rows, summary, server = run_edge(args, f"http://{HOST}:{args.port}", "direct", folder)
    offloaded = [r for r in rows if r["offloaded"] and not r["fallback"]]
    if not offloaded:
        raise SystemExit("link_vs_model: the direct run offloaded no image: nothing to calibrate overhead_ms on")
    loopback = {"name": "loopback (direct run, no relay)", "rtt_ms": 0.0, "uplink_mbps": LOOPBACK_MBPS}
    model = cost_model(args, "loopback", loopback, "wire")
    residuals = [r["latency_ms"] - predicted_ms(model, models, r) for r in offloaded]
    measured = statistics.fmean(r["latency_ms"] for r in offloaded)
    generalist = args.measured[args.generalist_key]
    return {
        "edge_summary": summary,
        "server": server,
        "offloaded_images": len(offloaded),
        "offloaded_mean_ms": measured,
        # gate, base64/JSON, the HTTP client and loopback, the server's parsing before its clock starts
        "edge_side_ms": measured - server["in_server_ms"] - generalist,
        "calibration": {
            "overhead_ms": max(0.0, statistics.fmean(residuals)),  # a profile's overhead_ms cannot be negative
            "residual_mean_ms": statistics.fmean(residuals),
            "residual_p50_ms": statistics.median(residuals),
            "residual_stdev_ms": statistics.stdev(residuals) if len(residuals) > 1 else 0.0,
            "images": len(residuals),
        },
    }


def loss_hits(latencies: list[float], predicted: list[float]) -> dict:
    """The offloaded images that waited the relay's extra RTO: over the median by more than half of it."""
    hold = RTO_S * 1e3
    cut = statistics.median(latencies) + hold / 2
    hit = [x > cut for x in latencies]
    clean = [x for x, h in zip(latencies, hit, strict=True) if not h]
    base = statistics.median(clean)
    excess = sum(x - base for x, h in zip(latencies, hit, strict=True) if h) / len(latencies)
    return {
        "hold_ms": hold,
        "threshold_ms": cut,
        "images": len(latencies),
        "hits": sum(hit),
        "excess_mean_ms": excess,  # what the hits add to the offloaded mean
        "nominal_excess_mean_ms": sum(hit) * hold / len(latencies),
        "without_hits": compare(clean, [p for p, h in zip(predicted, hit, strict=True) if not h], judged=False),
    }


def run_link(args, link, models: dict, folder: str) -> dict:
    name, rtt, uplink, loss = link
    with relay_process(link, args.port, folder) as port:
        rows, summary, server = run_edge(args, f"http://{HOST}:{port}", name, folder)
    result = {"link": {"name": name, "rtt_ms": rtt, "uplink_mbps": uplink, "loss": loss}, "edge_summary": summary}
    result["fallbacks"] = sum(r["fallback"] for r in rows)
    result["server"] = server
    groups = {
        "offloaded": [r for r in rows if r["offloaded"] and not r["fallback"]],  # a fallback got no expert answer
        "edge_only": [r for r in rows if not r["offloaded"]],
    }
    variants = {f"{b}_{o}": (b, o) for b in ("wire", "raw") for o in ("pure", "calibrated")}
    cost_models = {v: link_cost_model(args, link, b, o) for v, (b, o) in variants.items()}
    result["predicted_with"] = {
        v: {"image_bytes": m.image_bytes, "overhead_ms": m.profile.link.overhead_ms} for v, m in cost_models.items()
    }
    for group, members in groups.items():
        measured = [r["latency_ms"] for r in members]
        if len(members) < MIN_VERDICT_IMAGES:
            why = f"fewer than {MIN_VERDICT_IMAGES} images"
        elif loss:
            why = "loss: the cost model has no loss term"
        else:
            why = None
        result[group] = {"images": len(members), "no_verdict": why}
        for v, model in cost_models.items():
            predicted = [predicted_ms(model, models, r) for r in members]
            result[group][v] = compare(measured, predicted, judged=why is None)
            if loss and group == "offloaded" and v == "wire_calibrated" and members:
                result["loss_hits"] = loss_hits(measured, predicted)
    return result


def explain(result: dict, direct: dict, expert_alone_ms: float) -> dict | None:
    """The offloaded mean's gap (measured - pure prediction, wire bytes) split into what the cost model leaves
    out; and what is left once the calibrated overhead_ms is in."""
    pure, calibrated = result["offloaded"]["wire_pure"], result["offloaded"]["wire_calibrated"]
    if not pure["images"]:
        return None
    gap = pure["mean"]["measured_ms"] - pure["mean"]["predicted_ms"]
    parts = {
        "gap_ms": gap,
        "serving_overhead_ms": direct["server"]["overhead_ms"],  # from the direct run: no transfer inside it
        "model_slower_in_server_ms": result["server"]["model_ms"] - expert_alone_ms,  # sharing 2 cores with the edge
        "edge_side_ms": direct["edge_side_ms"],
        "loss_holds_ms": result["loss_hits"]["excess_mean_ms"] if "loss_hits" in result else 0.0,
    }
    # what is left: the relay (its process on the 2 cores, timers of ~1 ms granularity per direction) and noise
    parts["rest_ms"] = gap - sum(v for k, v in parts.items() if k != "gap_ms")
    parts["left_after_calibration_ms"] = calibrated["mean"]["measured_ms"] - calibrated["mean"]["predicted_ms"]
    return parts


# ---- report ----------------------------------------------------------------------------------------------------
def verdict(c: dict, stat: str, why: str | None) -> list[str]:
    s = c[stat]
    if why:
        word = "n/a (loss)" if why.startswith("loss") else "n/a"
    else:
        word = "PASS" if s["pass"] else "**MISS**"
    return [f"{s['predicted_ms']:.2f}", f"{s['ratio']:.2f}", word]


def link_label(link: dict) -> str:
    loss = f", loss {link['loss']:g}" if link["loss"] else ""
    return f"{link['name']} ({link['rtt_ms']:g} ms, {link['uplink_mbps']:g} Mbit/s{loss})"


def report(args, results: list[dict], direct: dict, times: dict, expert_alone_ms: float) -> None:
    print(f"\n## Measured vs cost model: {args.export}, {args.images}\n")
    print("Compute times at batch 1 on this machine; the prediction uses ONNX Runtime's (what edge and serve run):\n")
    print("| model | key | PyTorch ms (`profile`, 1 torch thread) | ONNX Runtime ms (1 thread, median) |")
    print("|---|---|---:|---:|")
    for name, t in times.items():
        torch_ms = f"{t['torch_ms']:.3f}" if t["torch_ms"] is not None else "n/a"
        print(f"| {name} | {t['key']} | {torch_ms} | {t['onnx_ms']:.3f} |")

    c, s = direct["calibration"], direct["server"]
    model_slower = s["model_ms"] - expert_alone_ms
    print(
        f"\nCalibration on the direct run (loopback, no relay, {c['images']} offloaded images): overhead_ms = mean of"
        f" measured − generalist − expert = **{args.overhead_ms:.2f} ms** (p50 {c['residual_p50_ms']:.2f}, stdev"
        f" {c['residual_stdev_ms']:.2f}); by parts: serving overhead {s['overhead_ms']:.2f} + edge side"
        f" {direct['edge_side_ms']:.2f} + model slower in server {model_slower:.2f} ms. Written into each link's"
        " profile YAML as link.overhead_ms and read back with costs.load_profile; the links are out of sample."
    )
    print(
        f"\nPredicted: pure = the cost model as shipped (overhead_ms 0), calibrated = with overhead_ms"
        f" {args.overhead_ms:.2f}; both with image_bytes = {args.image_bytes['wire']} B, the JSON+base64 request body"
        f" (headers not counted). PASS: within {TOLERANCE:.0%}. First image of each run not counted.\n"
    )
    print("| link | images | statistic | measured ms | pure ms | ratio | pure | calibrated ms | ratio | calibrated |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---|")
    small = []
    for r in results:
        for group in ("offloaded", "edge_only"):
            g = r[group]
            if g["images"] < MIN_VERDICT_IMAGES:
                small.append((r, group))
                continue
            pure, cal = g["wire_pure"], g["wire_calibrated"]
            for stat in ("mean", "p50"):
                cells = [link_label(r["link"]), f"{group.replace('_', '-')} ({g['images']})", stat]
                cells += [f"{pure[stat]['measured_ms']:.2f}", *verdict(pure, stat, g["no_verdict"])]
                print("| " + " | ".join([*cells, *verdict(cal, stat, g["no_verdict"])]) + " |")
    for group in ("edge_only", "offloaded"):
        entries = [(r, r[group]) for r, grp in small if grp == group]
        if not entries:
            continue
        parts = [
            f"{r['link']['name']} {g['images']}"
            + (
                f" (measured mean {g['wire_pure']['mean']['measured_ms']:.2f} vs predicted"
                f" {g['wire_calibrated']['mean']['predicted_ms']:.2f} ms)"
                if g["images"]
                else ""
            )
            for r, g in entries
        ]
        print(
            f"\n{group.replace('_', '-').capitalize()} images per link: {', '.join(parts)}: fewer than"
            f" {MIN_VERDICT_IMAGES}, so no PASS/MISS and no row above."
        )

    cells = []
    for r in results:
        g = r["offloaded"]
        if g["images"] < MIN_VERDICT_IMAGES:
            continue
        words = [verdict(g[v], "mean", g["no_verdict"])[1:] for v in ("raw_pure", "raw_calibrated")]
        cells.append(f"{r['link']['name']} {words[0][0]} {words[0][1]} / {words[1][0]} {words[1][1]}")
    if cells:
        print(
            f"\nWith the raw image as image_bytes ({args.raw_bytes:g} B, the profile default) instead, offloaded"
            f" mean ratio pure / calibrated: {'; '.join(cells)}."
        )

    for r in results:
        h = r.get("loss_hits")
        if h is None:
            continue
        cal = r["offloaded"]["wire_calibrated"]
        clean = h["without_hits"]
        print(
            f"\n{link_label(r['link'])}: no PASS/MISS — the cost model has no loss term, so both predictions are"
            f" the lossless ones and a verdict would test a term it does not have. {h['hits']} of {h['images']}"
            f" offloaded images hit the relay's extra {h['hold_ms']:g} ms hold (latency over the median +"
            f" {h['hold_ms'] / 2:g} ms); they add {h['excess_mean_ms']:.2f} ms to the mean"
            f" ({h['hits']} × {h['hold_ms']:g} / {h['images']} = {h['nominal_excess_mean_ms']:.2f} nominal)."
            f" Measured mean {cal['mean']['measured_ms']:.2f} vs calibrated {cal['mean']['predicted_ms']:.2f} ms"
            f" (ratio {cal['mean']['ratio']:.2f}); without the hit images: {clean['mean']['measured_ms']:.2f} vs"
            f" {clean['mean']['predicted_ms']:.2f} ms (ratio {clean['mean']['ratio']:.2f}), for information."
        )

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
    print(f"\nWhere the offloaded mean's gap to the pure prediction goes (model alone: {expert_alone_ms:.2f} ms, the")
    print("experts' median in ONNX Runtime; edge side: direct run's offloaded mean − its in-server time − the")
    print("generalist; rest: the relay process, its ~1 ms timers, noise), and what is left with the calibrated one:\n")
    print(
        "| link | gap to pure ms | serving overhead ms | model slower in server ms | edge side ms | loss holds ms |"
        " rest ms | measured − calibrated ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        e = r["explained"]
        if e is None:
            print(f"| {r['link']['name']} | n/a (no offloaded image) | | | | | | |")
            continue
        print(
            f"| {r['link']['name']} | {e['gap_ms']:.2f} | {e['serving_overhead_ms']:.2f} | "
            f"{e['model_slower_in_server_ms']:.2f} | {e['edge_side_ms']:.2f} | {e['loss_holds_ms']:.2f} | "
            f"{e['rest_ms']:.2f} | {e['left_after_calibration_ms']:.2f} |"
        )
    fallbacks = sum(r["fallbacks"] for r in results)
    if fallbacks:
        print(f"\n{fallbacks} offloaded image(s) fell back to the generalist (no expert answer): not counted above.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="export folder (served, and its generalist run on the edge)")
    p.add_argument("--images", required=True, help="folder of images for `edge`")
    p.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    p.add_argument("--links", nargs="+", default=DEFAULT_LINKS, help="NAME:RTT_MS:UPLINK_MBPS[:LOSS] per emulated link")
    p.add_argument("--threads", type=int, default=1, help="the server's ONNX Runtime threads")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    links = [parse_link(text) for text in args.links]
    if len({name for name, *_ in links}) != len(links):
        raise SystemExit("--links: give each link its own name")
    args.port = args.port or free_port()
    # one torch thread: the PyTorch times compare with ONNX Runtime's one thread, and the edge's own torch ops
    # (softmax, gate) do not fight the server for the 2 cores
    torch.set_num_threads(1)
    bundle = load_bundle(args.export)
    models = export_models(bundle)
    args.stored = bundle.stored_size
    with open(BASE_PROFILE, encoding="utf-8") as f:
        args.base = yaml.safe_load(f)
    args.image_bytes = {"wire": request_body_bytes(bundle), "raw": None}  # None: the profile's (raw C*H*W) bytes
    args.raw_bytes = args.base.get("image_bytes") or 3 * args.stored**2  # what the cost model makes of None

    with tempfile.TemporaryDirectory(prefix="link_vs_model_") as folder:
        args.folder = folder
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
            start_new_session=True,  # its own process group: any worker it starts dies with it
        )
        try:
            try:
                wait_healthy(server, f"http://{HOST}:{args.port}")
            except RuntimeError as err:
                log.seek(0)
                raise SystemExit(f"link_vs_model: {err}\n{log.read()[-2000:]}") from None
            warm_server(args.port, bundle)
            direct = run_direct(args, models, folder)
            args.overhead_ms = direct["calibration"]["overhead_ms"]
            results = [run_link(args, link, models, folder) for link in links]
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
    report(args, results, direct, times, expert_alone_ms)
    if args.out:
        document = {
            "export": args.export,
            "images": args.images,
            "server_threads": args.threads,
            "base_profile": str(BASE_PROFILE),
            "prediction_times": "ONNX Runtime, 1 intra-op thread, batch 1 (what edge and serve run)",
            "compute_times": times,
            "measured_ms_used": args.measured,
            "image_bytes": {"wire": args.image_bytes["wire"], "raw": args.raw_bytes},
            "calibrated_overhead_ms": args.overhead_ms,
            "tolerance": TOLERANCE,
            "min_verdict_images": MIN_VERDICT_IMAGES,
            "cpu_count": os.cpu_count(),
            "direct": direct,
            "expert_alone_ms": expert_alone_ms,
            "links": results,
        }
        write_json(args.out, document)
        print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()

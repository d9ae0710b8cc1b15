"""`python -m askexpert edge`: the edge device's side of a deployment, one CSV row per image.

    python -m askexpert edge --export exports/demo --server http://127.0.0.1:8000 --images photos/ --out preds.csv

Runs the export's generalist here (ONNX Runtime, batch 1: what one image costs on the edge), gates and routes
exactly as `route` does (same operating point, from the export's manifest), and sends unsure images to the
expert server (`serve`), `--concurrency` images in flight. The edge keeps the generalist's probabilities and
fuses the expert's logits with them (`fuse`), so nothing but the stored image goes on the wire.

An offloaded image whose request fails (connect or read deadline, HTTP error, an expert's open circuit
breaker) gets the generalist's answer, marked `fallback` (its `offloaded` stays true: the gate's decision).
The exit status is 0 when every image was answered, fallbacks included.

Columns: image, prediction, prediction_id, confidence, offloaded, expert (index, as in `route`), fallback,
latency_ms (generalist + offload, measured per image), generalist_prediction, generalist_probability,
model_version (the server's, for an answered offload), error (why it fell back). OUT.summary.json (and the
console) give the accuracy when the images sit in folders named after classes, the offload ratio, the
fallbacks, the breaker openings and the p50/p95/p99 latency.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from askexpert.collab.routing import NO_EXPERT, check_threshold, decide, fuse
from askexpert.commands.route import COLUMNS as ROUTE_COLUMNS
from askexpert.commands.route import EXTENSIONS, find_images, read_images, write_csv
from askexpert.deploy.bundle import load_bundle
from askexpert.deploy.client import ExpertClient, OffloadFailed
from askexpert.deploy.timing import percentiles
from askexpert.deploy.wire import check_token
from askexpert.errors import UserError
from askexpert.files.atomic import write_json
from datamodules.partitions import Partition

TOKEN_ENV = "ASKEXPERT_TOKEN"
# route's columns, with what a deployment adds: whether the answer is a fallback, the measured latency, the
# server's model version and why an offload failed
COLUMNS = (*ROUTE_COLUMNS[:6], "fallback", "latency_ms", *ROUTE_COLUMNS[6:], "model_version", "error")


def parser():
    from askexpert.parsers import command_parser

    p = command_parser("edge", "Classify images on the edge, offloading unsure ones to an expert server.", False)
    p.add_argument("--export", type=str, required=True, help="export folder (the same one the server serves)")
    p.add_argument("--server", type=str, required=True, help="expert server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--images", type=str, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=str, required=True, help="CSV file to write (and OUT.summary.json)")
    p.add_argument("--token", type=str | None, default=None, help=f"the server's bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--concurrency", type=int, default=4, help="images in flight at once")
    p.add_argument("--connect_timeout_s", type=float, default=1.0, help="deadline to open a connection")
    p.add_argument("--read_timeout_s", type=float, default=5.0, help="deadline for the expert's reply")
    p.add_argument("--breaker_failures", type=int, default=3, help="failures in a row that open an expert's breaker")
    p.add_argument("--breaker_cooldown_s", type=float, default=5.0, help="how long an open breaker refuses")
    p.add_argument("--threshold", type=float | None, default=None, help="override the export's threshold")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per generalist call")
    p.add_argument("--precision", type=str, default="fp32", help="the generalist's: fp32, or int8 (export --int8 true)")
    return p


def check_args(args) -> None:
    check_threshold(args.threshold)
    import httpx

    try:
        url = httpx.URL(args.server)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise UserError(f"--server must be an http:// or https:// URL with a host, got {args.server!r}")
    if args.concurrency < 1 or args.breaker_failures < 1 or args.threads < 0:
        raise UserError("--concurrency and --breaker_failures must be at least 1, --threads at least 0")
    if min(args.connect_timeout_s, args.read_timeout_s) <= 0 or args.breaker_cooldown_s < 0:
        raise UserError("the deadlines must be positive and --breaker_cooldown_s at least 0")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a CSV file name")


class EdgeRouter:
    """The generalist, the gate and the router of `route`, one image at a time, with the server behind it."""

    def __init__(self, bundle, client: ExpertClient, threshold: float, threads: int, precision: str = "fp32"):
        self.bundle, self.client, self.threshold = bundle, client, threshold
        self.generalist = bundle.session("generalist", threads, precision=precision)
        op = bundle.operating_point
        self.temperature, self.gate, self.top_k, self.fusion = (
            op["temperature_value"],
            op["gate"],
            op["top_k"],
            op["fusion"],
        )
        self.coverage = Partition(bundle.manifest["partition"]["experts"], bundle.class_names).coverage()

    def classify(self, image: np.ndarray) -> dict:
        start = time.perf_counter()
        logits = torch.from_numpy(self.generalist.run(None, {"images": image[None]})[0])
        decision = decide(logits, self.coverage, self.temperature, self.gate, self.top_k)
        probs, expert = decision.probs, int(decision.routes(self.threshold)[0])
        offloaded = expert != NO_EXPERT
        answer, fallback, version, error = int(probs[0].argmax()), False, "", ""
        if offloaded:
            try:
                reply = self.client.ask(f"expert_{expert}", image)
                answer = int(fuse(probs, torch.tensor([reply["logits"]]), self.fusion)[0])
                version = reply["model_version"]
            except OffloadFailed as why:
                fallback, error = True, str(why)
        top_p, top_i = probs[0].max(-1)
        names = self.bundle.class_names
        return {
            "prediction": names[answer],
            "prediction_id": answer,
            "confidence": round(float(decision.confidence[0]), 6),
            "offloaded": offloaded,
            "expert": expert if offloaded else "",
            "fallback": fallback,
            "latency_ms": round(1000 * (time.perf_counter() - start), 3),
            "generalist_prediction": names[int(top_i)],
            "generalist_probability": round(float(top_p), 6),
            "model_version": version,
            "error": error,
        }


def summarise(rows: list[dict], client: ExpertClient, labels: list[int | None]) -> dict:
    latency = np.array([r["latency_ms"] for r in rows], dtype=np.float64)
    known = [(r["prediction_id"], y) for r, y in zip(rows, labels, strict=True) if y is not None]
    offloaded = sum(r["offloaded"] for r in rows)
    return {
        "images": len(rows),
        "labelled": len(known),
        "accuracy": (sum(p == y for p, y in known) / len(known)) if known else None,
        "offloaded": offloaded,
        "offload_ratio": offloaded / max(1, len(rows)),
        "fallbacks": sum(r["fallback"] for r in rows),
        "requests_sent": client.attempts,
        "breaker_openings": client.breakers_opened(),
        "fallback_reasons": dict(Counter(r["error"] for r in rows if r["fallback"]).most_common()),
        "latency_ms": {key: round(value, 3) for key, value in percentiles(latency, (50, 95, 99)).items()},
    }


def folder_labels(paths: list[str], root: str, class_names: list[str]) -> list[int | None]:
    """An image's class when its folder (the first one under `root`) is named after one, else None."""
    index = {name: i for i, name in enumerate(class_names)}
    labels = []
    for path in paths:
        parts = os.path.relpath(path, root).split(os.sep)
        labels.append(index.get(parts[0]) if len(parts) > 1 else None)
    return labels


def run(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    check_args(args)
    bundle = load_bundle(args.export)
    bundle.model_entry("generalist", args.precision)  # an unknown precision, or no int8 file: one line, now
    threshold = bundle.operating_point["threshold"] if args.threshold is None else args.threshold
    paths = find_images(args.images)
    images, readable, skipped = read_images(paths, bundle.stored_size)
    if not readable:
        raise UserError(f"no readable image in {args.images} (looked for {', '.join(EXTENSIONS)})")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    check_token(token)
    client = ExpertClient(
        args.server,
        bundle.expert_names,
        token,
        args.connect_timeout_s,
        args.read_timeout_s,
        args.breaker_failures,
        args.breaker_cooldown_s,
        max_connections=args.concurrency,
        version=bundle.version,
        widths={name: int(bundle.manifest["models"][name]["output"]["shape"][-1]) for name in bundle.expert_names},
    )
    unreachable = client.check_server()
    if unreachable:
        print(f"askexpert edge: warning: {args.server} is not answering ({unreachable}); unsure images fall back")
    router = EdgeRouter(bundle, client, threshold, args.threads, args.precision)
    arrays = images.numpy()
    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            rows = list(pool.map(router.classify, arrays))
    finally:
        client.close()
    for row, path in zip(rows, readable, strict=True):
        row["image"] = os.path.relpath(path, args.images)
    summary = summarise(rows, client, folder_labels(readable, args.images, bundle.class_names))
    summary.update(server=args.server, threshold=threshold, concurrency=args.concurrency, skipped=len(skipped))
    write_csv(args.out, rows, COLUMNS)
    write_json(f"{os.path.splitext(args.out)[0]}.summary.json", summary)
    _print_summary(summary, args.out)
    if summary["fallbacks"]:
        reasons = ", ".join(f"{n} x {why}" for why, n in summary["fallback_reasons"].items())
        alone = " (every offloaded image: these answers are the generalist's alone)"
        whole = alone if summary["fallbacks"] == summary["offloaded"] else ""
        print(f"askexpert edge: warning: {summary['fallbacks']} fallbacks{whole}: {reasons}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return summary


def _print_summary(s: dict, out: str) -> None:
    accuracy = (
        f", accuracy {100 * s['accuracy']:.2f} % on {s['labelled']} labelled" if s["accuracy"] is not None else ""
    )
    lat = s["latency_ms"]
    print(
        f"{s['images']} images answered{accuracy}; {s['offloaded']} offloaded ({100 * s['offload_ratio']:.1f} %), "
        f"{s['fallbacks']} fell back to the generalist, breakers opened {s['breaker_openings']}x; "
        f"latency p50 {lat['p50']:.1f} / p95 {lat['p95']:.1f} / p99 {lat['p99']:.1f} ms -> {out}"
    )

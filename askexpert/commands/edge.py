"""`python -m askexpert edge`: the edge device's side of a deployment, one CSV row per image.

    python -m askexpert edge --export exports/demo --server http://127.0.0.1:8000 --images photos/ --out preds.csv

Runs the export's generalist here (ONNX Runtime, batch 1: what one image costs on the edge), gates and routes
exactly as `route` does (same operating point, from the export's manifest), and sends unsure images to the
expert server (`serve`), `--concurrency` images in flight. The edge keeps the generalist's probabilities and
fuses the expert's logits with them (`fuse`), so nothing but the stored image goes on the wire.

An offloaded image whose request fails (connect or read deadline, HTTP error, an expert's open circuit
breaker) gets the generalist's answer, marked `fallback` (its `offloaded` stays true: the gate's decision).
The exit status is 0 when every image was answered, fallbacks included.

A second expert (the manifest's `operating_point.second_expert`, written by `export` from a two-expert point):
an image whose top-k mass is split between two experts is sent to both at once, under the same deadlines, and
answered as `route` answers it: both replies fused (`fuse_two`); one reply fused alone (`fuse`, a partial
answer: `experts_answered` 1, `error` names the expert that failed); none, the generalist (`fallback`).

`--record FILE.npz` keeps what the experts taught (for `adapt --record`): every offloaded image with an expert
answer, as sent, and the class probabilities the edge used: the expert's, or both experts' mixed by the top-k
mass each owns; an answer of "other" teaches nothing and is left out (askexpert/adapt/record.py has the
format). The file is written at the end, atomically; a path that cannot be written is refused before any image
is classified.

Columns: image, prediction, prediction_id, confidence, offloaded, expert (index, as in `route`), second_expert
(the expert also asked, empty when none), experts_answered (0, 1 or 2), fallback, latency_ms (generalist +
offload, measured per image), generalist_prediction, generalist_probability, model_version (the server's, for an
answered offload), error (why it fell back, or why one of two experts did not answer). OUT.summary.json (and
the console) give the accuracy when the images sit in folders named after classes, the offload ratio, the
fallbacks, the images asked of two experts and the partial answers, the breaker openings and the p50/p95/p99
latency.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from askexpert.collab.routing import (
    NO_EXPERT,
    check_threshold,
    class_probs,
    decide,
    fuse,
    fuse_two,
)
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
# route's columns, with what a deployment adds: the second expert (always there: a deployment log keeps one
# schema), how many experts answered, whether the answer is a fallback, the measured latency, the server's model
# version and why an offload failed
COLUMNS = (
    *ROUTE_COLUMNS[:6],
    "second_expert",
    "experts_answered",
    "fallback",
    "latency_ms",
    *ROUTE_COLUMNS[6:],
    "model_version",
    "error",
)


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
    p.add_argument("--record", type=str | None, default=None, help="write the experts' answers to this .npz (adapt)")
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
    if args.record is not None:
        check_record_path(args.record)


def check_record_path(path: str) -> None:
    """Refuse a --record path that could not be written at the end, before any image is classified."""
    if os.path.isdir(path):
        raise UserError(f"--record {path} is a folder; give a file name (e.g. answers.npz)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--record {path}: folder {folder} does not exist")
    # the record is written beside its final name and renamed over it: the folder must take new files
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--record {path}: folder {folder} is not writable")


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
        self.pair = op.get("second_expert")  # {"margin", "fusion"}, or None: one expert per image
        self.coverage = Partition(bundle.manifest["partition"]["experts"], bundle.class_names).coverage()

    def classify(self, image: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """(the image's CSV row, the class probabilities its experts taught, None when no expert answered)."""
        start = time.perf_counter()
        logits = torch.from_numpy(self.generalist.run(None, {"images": image[None]})[0])
        decision = decide(logits, self.coverage, self.temperature, self.gate, self.top_k)
        probs, expert = decision.probs, int(decision.routes(self.threshold)[0])
        second = int(decision.second_routes(self.threshold, self.pair and self.pair["margin"])[0])
        asked = [e for e in (expert, second) if e != NO_EXPERT]
        # every expert asked at once (none when the image stays here); the answer waits for the slower one
        outcomes = self.client.ask_each([f"expert_{e}" for e in asked], image)
        replies = [(e, o) for e, o in zip(asked, outcomes, strict=True) if not isinstance(o, OffloadFailed)]
        failed = [(e, o) for e, o in zip(asked, outcomes, strict=True) if isinstance(o, OffloadFailed)]
        answer, soft = self._answer(probs, decision.mass, replies)
        if len(asked) == 1:
            error = str(failed[0][1]) if failed else ""  # as before the second expert: the reason alone
        else:
            error = "; ".join(f"expert_{e}: {why}" for e, why in failed)
        top_p, top_i = probs[0].max(-1)
        names = self.bundle.class_names
        row = {
            "prediction": names[answer],
            "prediction_id": answer,
            "confidence": round(float(decision.confidence[0]), 6),
            "offloaded": bool(asked),
            "expert": expert if asked else "",
            "second_expert": second if second != NO_EXPERT else "",
            "experts_answered": len(replies),
            "fallback": bool(asked) and not replies,
            "latency_ms": round(1000 * (time.perf_counter() - start), 3),
            "generalist_prediction": names[int(top_i)],
            "generalist_probability": round(float(top_p), 6),
            "model_version": replies[0][1]["model_version"] if replies else "",
            "error": error,
        }
        return row, soft

    def _answer(self, probs: torch.Tensor, mass: torch.Tensor, replies: list[tuple[int, dict]]):
        """(the answer, the soft label to record) from the experts' `replies` (the first expert's first), fused as
        `route` fuses them: two with `fuse_two`, one alone with `fuse`, none: the generalist's."""
        if not replies:
            return int(probs[0].argmax()), None
        logits = [torch.tensor([reply["logits"]]) for _, reply in replies]
        if len(replies) == 2:
            answer = fuse_two(probs, logits[0], logits[1], mass, self.pair["fusion"])
        else:
            answer = fuse(probs, logits[0], self.fusion)
        # the soft label: each answering expert's class probabilities, weighted by the top-k mass it owns (the
        # router's own belief in it); "other" says nothing about the classes and drops out, as in fuse_two
        weights = mass[0, : len(replies)] if len(replies) == 2 else torch.ones(1, dtype=mass.dtype)
        label = torch.zeros(probs.shape[-1], dtype=torch.float64)
        for weight, expert_logits in zip(weights, logits, strict=True):
            p, said_other = class_probs(expert_logits, probs.shape[-1])
            label += 0.0 if bool(said_other[0]) else float(weight) * p[0].double()
        total = float(label.sum())
        soft = (label / total).float().numpy() if total > 0 else None
        return int(answer[0]), soft


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
        "asked_two": sum(r["second_expert"] != "" for r in rows),
        "partial_answers": sum(r["second_expert"] != "" and r["experts_answered"] == 1 for r in rows),
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
    pair = bundle.operating_point.get("second_expert")  # checked, with the whole manifest, by load_bundle
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
        max_connections=args.concurrency * (2 if pair else 1),  # two requests per image in flight, at most
        version=bundle.version,
        widths={name: int(bundle.manifest["models"][name]["output"]["shape"][-1]) for name in bundle.expert_names},
    )
    arrays = images.numpy()
    try:
        # the generalist first: a model file ONNX Runtime cannot load is the one line, before the server is asked
        router = EdgeRouter(bundle, client, threshold, args.threads, args.precision)
        unreachable = client.check_server()
        if unreachable:
            print(f"askexpert edge: warning: {args.server} is not answering ({unreachable}); unsure images fall back")
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            answers = list(pool.map(router.classify, arrays))
    finally:
        client.close()
    rows = [row for row, _ in answers]
    for row, path in zip(rows, readable, strict=True):
        row["image"] = os.path.relpath(path, args.images)
    summary = summarise(rows, client, folder_labels(readable, args.images, bundle.class_names))
    summary.update(server=args.server, threshold=threshold, concurrency=args.concurrency, skipped=len(skipped))
    summary["second_expert"] = pair
    taught = [soft for _, soft in answers]
    if args.record is not None:
        summary["recorded"] = sum(soft is not None for soft in taught)
    write_csv(args.out, rows, COLUMNS)
    write_json(f"{os.path.splitext(args.out)[0]}.summary.json", summary)
    if args.record is not None:  # after the CSV: a record that fails to write leaves the answers written
        _record(args.record, arrays, taught, bundle)
    _print_summary(summary, args.out)
    if summary["fallbacks"]:
        reasons = ", ".join(f"{n} x {why}" for why, n in summary["fallback_reasons"].items())
        alone = " (every offloaded image: these answers are the generalist's alone)"
        whole = alone if summary["fallbacks"] == summary["offloaded"] else ""
        print(f"askexpert edge: warning: {summary['fallbacks']} fallbacks{whole}: {reasons}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return summary


def _record(path: str, images: np.ndarray, soft_labels: list, bundle) -> None:
    """Write the images an expert answered and their soft labels to `path` (askexpert/adapt/record.py's format).
    Nothing is written when no expert answered (a record holds at least one image)."""
    from askexpert.adapt.record import write_record

    kept = [i for i, soft in enumerate(soft_labels) if soft is not None]
    if not kept:
        print(f"askexpert edge: warning: no expert answer to record; {path} was not written", file=sys.stderr)
        return
    labels = np.stack([soft_labels[i] for i in kept])
    write_record(path, images[kept], labels, bundle.class_names, bundle.version)


def _print_summary(s: dict, out: str) -> None:
    accuracy = (
        f", accuracy {100 * s['accuracy']:.2f} % on {s['labelled']} labelled" if s["accuracy"] is not None else ""
    )
    lat = s["latency_ms"]
    two = ""
    if s["second_expert"]:
        two = f"{s['asked_two']} asked of two experts ({s['partial_answers']} answered by one), "
    recorded = f"; {s['recorded']} expert answers recorded" if "recorded" in s else ""
    print(
        f"{s['images']} images answered{accuracy}; {s['offloaded']} offloaded ({100 * s['offload_ratio']:.1f} %), "
        f"{s['fallbacks']} fell back to the generalist, {two}breakers opened {s['breaker_openings']}x; "
        f"latency p50 {lat['p50']:.1f} / p95 {lat['p95']:.1f} / p99 {lat['p99']:.1f} ms{recorded} -> {out}"
    )

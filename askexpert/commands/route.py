"""`python -m askexpert route`: classify a folder of images with a trained system, one CSV row per image.

    python -m askexpert route --run runs/demo --images my_photos/ --out preds.csv

The run's report gives the operating point (gate, temperature, threshold, top-k, fusion) chosen by the
pipeline or the last `evaluate`; `--threshold` overrides the threshold. When the report has a two-expert point
(`evaluate --routing.second_expert.enabled true`), route uses it by default: its own threshold, margin and
fusion, so an image whose top-k mass is split between two experts is answered by both (docs/collaborative.md);
`--routing.second_expert.enabled false` routes at the one-expert point instead, `.margin` and `.fusion` override
the point's (a margin given for a report without one uses the selected threshold). Images (png, jpg, jpeg, bmp,
gif, webp, tif; any sub-folder) are converted to RGB and resized to the run's image size. Columns: image (path
relative to the folder), prediction, prediction_id, confidence (the gate's value), offloaded, expert (its
index, empty when not offloaded), generalist_prediction, generalist_probability; with a second expert, a
`second_expert` column after `expert` (the index of the expert also asked, empty when none). Without one the
CSV is what it was before the option existed.
"""

from __future__ import annotations

import csv
import io
import os
from functools import partial

import torch

from askexpert.collab.evaluation import check_expert_classes
from askexpert.collab.logits import batched_logits, in_batches
from askexpert.collab.routing import (
    NO_EXPERT,
    check_margin,
    check_second_fusion,
    check_threshold,
    decide,
    fused_answers,
)
from askexpert.collab.second_expert import SecondExpert
from askexpert.errors import UserError
from askexpert.files.atomic import atomic_write_text
from askexpert.modules.loading import load_classifier
from askexpert.pipeline.finished_run import PipelineRun, open_finished_run
from datamodules.datamodule import stored_image_size
from datamodules.partitions import Partition

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
COLUMNS = (
    "image",
    "prediction",
    "prediction_id",
    "confidence",
    "offloaded",
    "expert",
    "generalist_prediction",
    "generalist_probability",
)


def parser():
    from askexpert.parsers import command_parser

    p = command_parser("route", "Classify a folder of images with a trained collaborative system.", with_data=False)
    p.add_argument("--run", type=str, required=True, help="pipeline run folder (with report.json)")
    p.add_argument("--images", type=str, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=str, required=True, help="CSV file to write")
    p.add_argument("--threshold", type=float | None, default=None, help="override the run's selected threshold")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--routing.second_expert.enabled",
        type=bool | None,
        default=None,
        help="ask a second expert when the router is torn (default: when the run's report has a two-expert point)",
    )
    p.add_argument(
        "--routing.second_expert.margin",
        type=float | None,
        default=None,
        help="ask the runner-up expert too iff the mass gap is below it, in [0, 1] (default: the report's)",
    )
    p.add_argument(
        "--routing.second_expert.fusion",
        type=str | None,
        default=None,
        help="how two experts' answers are fused: mass, expert, product or mean (default: the report's)",
    )
    return p


def find_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS) and not f.startswith(".")
        ]
    return found


def read_images(paths: list[str], image_size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """(uint8 images, readable paths, unreadable paths)."""
    from datamodules.imagefolder import decode_image

    images, readable, skipped = [], [], []
    for path in paths:
        try:
            images.append(decode_image(path, image_size))
            readable.append(path)
        except UserError:
            skipped.append(path)
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), readable, skipped
    return torch.stack(images), readable, skipped


def write_csv(path: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    """The one-row-per-image CSV of `route` and `edge`, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _check_args(args) -> None:
    check_threshold(args.threshold)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    second = args.routing.second_expert
    check_margin(second.margin)
    if second.fusion is not None:
        check_second_fusion(second.fusion)
    if second.enabled is False and (second.margin is not None or second.fusion is not None):
        raise UserError(
            "--routing.second_expert.margin and .fusion set a second expert that "
            "--routing.second_expert.enabled false turns off; give one or the other"
        )


def operating_point(finished: PipelineRun, options) -> tuple[dict, float]:
    """The routing (with `second_expert`: {"margin", "fusion"}, or None for one expert) and threshold to apply: the
    run's report's, the two-expert point unless `options` (`--routing.second_expert.*`) say otherwise."""
    if options.enabled is False:
        routing, threshold = finished.operating_point()
        return {**routing, "second_expert": None}, threshold
    routing, threshold = finished.operating_point(second_expert=True)
    point = routing["second_expert"] or {}
    margin = options.margin if options.margin is not None else point.get("margin")
    if margin is None:
        if options.enabled or options.fusion is not None:
            run_dir = finished.layout.root
            raise UserError(
                f"{run_dir}'s report has no second-expert point: give --routing.second_expert.margin, or evaluate "
                f"one with `python -m askexpert evaluate --run {run_dir} --routing.second_expert.enabled true`"
            )
        return routing, threshold
    # a margin without a report point keeps the selected threshold (operating_point returned it)
    fusion = options.fusion or point.get("fusion") or SecondExpert().fusion
    return {**routing, "second_expert": {"margin": float(margin), "fusion": fusion}}, threshold


def _generalist(run: PipelineRun, partition: Partition, device: str):
    """The run's generalist (on `device`) and its class names, refused if it does not answer the partition's
    classes."""
    layout = run.layout
    generalist = load_classifier(layout.best(layout.stage_dir("generalist")), map_location=device)
    if generalist.hparams.num_classes != partition.num_classes:
        raise UserError(
            f"the run's generalist answers {generalist.hparams.num_classes} classes "
            f"but its partition has {partition.num_classes}"
        )
    class_names = list(generalist.hparams.class_names or partition.class_names)
    partition.check_classes(class_names, "the run's generalist")
    return generalist, class_names


def _expert_logits(run: PipelineRun, partition: Partition, images, batch_size: int, device: str, e: int, rows):
    """Expert `e`'s logits of `images[rows]`, its model loaded (and its classes checked) for this call only."""
    family, layout = run.settings.specialization, run.layout
    expert = load_classifier(layout.best(layout.expert_dir(family, e)), map_location=device)
    check_expert_classes(expert.hparams.get("subset"), partition, e, f"{family}_{e}", layout.partition)
    return batched_logits(expert, in_batches(images[rows], batch_size))


def columns(second_expert: bool) -> tuple[str, ...]:
    """The CSV's columns: COLUMNS, with `second_expert` after `expert` when a second expert may be asked."""
    if not second_expert:
        return COLUMNS
    at = COLUMNS.index("expert") + 1
    return (*COLUMNS[:at], "second_expert", *COLUMNS[at:])


def _rows(paths: list[str], folder: str, answer, decision, routes, second_routes, class_names) -> list[dict]:
    """The CSV rows of the images at `paths` (`second_routes` None: one expert, no `second_expert` column)."""
    top_p, top_i = decision.probs.max(-1)
    results = []
    for i, path in enumerate(paths):
        offloaded = bool(routes[i] != NO_EXPERT)
        row = {
            "image": os.path.relpath(path, folder),
            "prediction": class_names[int(answer[i])],
            "prediction_id": int(answer[i]),
            "confidence": round(float(decision.confidence[i]), 6),
            "offloaded": offloaded,
            "expert": int(routes[i]) if offloaded else "",
            "generalist_prediction": class_names[int(top_i[i])],
            "generalist_probability": round(float(top_p[i]), 6),
        }
        if second_routes is not None:
            row["second_expert"] = int(second_routes[i]) if second_routes[i] != NO_EXPERT else ""
        results.append(row)
    return results


def run(argv: list[str]) -> list[dict]:
    args = parser().parse_args(argv)
    _check_args(args)
    finished = open_finished_run(args.run)
    routing, threshold = operating_point(finished, args.routing.second_expert)
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a CSV file name")
    if args.threshold is not None:
        threshold = args.threshold
    paths = find_images(args.images)
    # decoded at the size the run's data is stored at (what an edge device holds and sends); the models resize
    data = finished.settings.data
    stored = stored_image_size(data.source, getattr(data, "stored_size", None), data.image_size)
    images, readable, skipped = read_images(paths, stored)
    if not readable:
        raise UserError(f"no readable image in {args.images} (looked for {', '.join(EXTENSIONS)})")
    partition = finished.partition()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generalist, class_names = _generalist(finished, partition, device)
    logits = batched_logits(generalist, in_batches(images, args.batch_size))
    decision = decide(logits, partition.coverage(), routing["temperature_value"], routing["gate"], routing["top_k"])
    routes = decision.routes(threshold)
    expert_logits = partial(_expert_logits, finished, partition, images, args.batch_size, device)
    pair, second_routes, second = routing["second_expert"], None, None
    if pair is not None:
        second_routes = decision.second_routes(threshold, pair["margin"])
        second = (second_routes, decision.mass, pair["fusion"])
    answer = fused_answers(decision.probs, routes, expert_logits, routing["fusion"], second=second)
    results = _rows(readable, args.images, answer, decision, routes, second_routes, class_names)
    write_csv(args.out, results, columns(pair is not None))
    sent, where = f"{int((routes != NO_EXPERT).sum())} offloaded to experts", f"threshold {threshold:.2f}"
    if pair is not None:
        sent += f", {int((second_routes != NO_EXPERT).sum())} of them to two experts"
        where += f", margin {pair['margin']:.2f}, `{pair['fusion']}` fusion"
    print(f"{len(results)} images classified, {sent} ({where}) -> {args.out}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return results

"""`python -m askexpert route`: classify a folder of images with a trained system, one CSV row per image.

    python -m askexpert route --run runs/demo --images my_photos/ --out preds.csv

The run's report gives the operating point (gate, temperature, threshold, top-k, fusion) chosen by the
pipeline or the last `evaluate`; `--threshold` overrides the threshold. Images (png, jpg, jpeg, bmp, gif,
webp, tif; any sub-folder) are converted to RGB and resized to the run's image size. Columns: image (path
relative to the folder), prediction, prediction_id, confidence (the gate's value), offloaded, expert (its
index, empty when not offloaded), generalist_prediction, generalist_probability.
"""

from __future__ import annotations

import csv
import io
import json
import os

import torch

from askexpert.collab.evaluation import check_expert_classes
from askexpert.collab.routing import NO_EXPERT, check_threshold, confidence, fuse, select_experts
from askexpert.errors import UserError
from askexpert.files.atomic import atomic_write_text
from askexpert.modules.loading import load_classifier
from askexpert.runs.layout import RunLayout
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
    return p


def operating_point(run_dir: str) -> tuple[dict, float]:
    """The routing settings (temperature value, gate, top-k, fusion) and threshold the run's report selected."""
    report_path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(report_path):
        raise UserError(f"{run_dir} has no report.json yet: finish it with `python -m askexpert pipeline` first")
    try:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        routing, threshold = report["routing"], float(report["selected"]["threshold"])
        return {key: routing[key] for key in ("temperature_value", "gate", "top_k", "fusion")}, threshold
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise UserError(
            f"{report_path} is damaged; write it again with `python -m askexpert evaluate --run {run_dir}`"
        ) from None


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


@torch.no_grad()
def _logits(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    )


def run(argv: list[str]) -> list[dict]:
    from askexpert.commands.evaluate import saved_settings

    args = parser().parse_args(argv)
    check_threshold(args.threshold)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    layout = RunLayout(args.run)
    settings = saved_settings(args.run)
    from askexpert.commands.pipeline import check_finished

    check_finished(layout)
    routing, threshold = operating_point(args.run)
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a CSV file name")
    if args.threshold is not None:
        threshold = args.threshold
    paths = find_images(args.images)
    # decoded at the size the run's data is stored at (what an edge device holds and sends); the models resize
    data = settings.data
    stored = stored_image_size(data.source, getattr(data, "stored_size", None), data.image_size)
    images, readable, skipped = read_images(paths, stored)
    if not readable:
        raise UserError(f"no readable image in {args.images} (looked for {', '.join(EXTENSIONS)})")
    partition = Partition.load(layout.partition)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generalist = load_classifier(layout.best(layout.stage_dir("generalist")), map_location=device)
    if generalist.hparams.num_classes != partition.num_classes:
        raise UserError(
            f"the run's generalist answers {generalist.hparams.num_classes} classes "
            f"but its partition has {partition.num_classes}"
        )
    class_names = list(generalist.hparams.class_names or partition.class_names)
    partition.check_classes(class_names, "the run's generalist")
    probs = (_logits(generalist, images, args.batch_size).double() / routing["temperature_value"]).softmax(-1)
    conf = confidence(probs, routing["gate"])
    chosen = select_experts(probs, partition.coverage(), routing["top_k"])
    offloaded = (conf < threshold) & (chosen != NO_EXPERT)
    answer = probs.argmax(-1)
    for e in chosen[offloaded].unique().tolist():
        expert = load_classifier(layout.best(layout.expert_dir(settings.specialization, e)), map_location=device)
        check_expert_classes(
            expert.hparams.get("subset"), partition, e, f"{settings.specialization}_{e}", layout.partition
        )
        rows = torch.nonzero(offloaded & (chosen == e)).flatten()
        answer[rows] = fuse(probs[rows], _logits(expert, images[rows], args.batch_size), routing["fusion"])
        del expert
    top_p, top_i = probs.max(-1)
    results = []
    for i, path in enumerate(readable):
        results.append(
            {
                "image": os.path.relpath(path, args.images),
                "prediction": class_names[int(answer[i])],
                "prediction_id": int(answer[i]),
                "confidence": round(float(conf[i]), 6),
                "offloaded": bool(offloaded[i]),
                "expert": int(chosen[i]) if offloaded[i] else "",
                "generalist_prediction": class_names[int(top_i[i])],
                "generalist_probability": round(float(top_p[i]), 6),
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(args.out, buffer.getvalue())
    sent = int(offloaded.sum())
    print(f"{len(results)} images classified, {sent} offloaded to experts (threshold {threshold:.2f}) -> {args.out}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return results

"""`adapt --export EXPORT`: the adapted generalist into an export folder of the same run, as a new version.

The export's version is the first 12 hex digits of its manifest's SHA-256 (askexpert/deploy/bundle.py), so new
weights and a new operating point are a new version; the edge client reads the manifest when it starts, so it
runs the adapted generalist from its next start, and the server (whose experts did not change) keeps serving.

The generalist is exported and verified against PyTorch as `export` does (same exporter, same agreement rules,
passed in by the command: the library never imports a command), its int8 copy is made again when the export has
one, and the operating point takes the adapted τ and temperature. The folder is copied aside, changed there and
swapped in with two renames, so a reader sees the old export or the new one, never a mix. Its MODEL_CARD.md is
written again for the new version (from `ExportTools.report`, the run's report.json); without a report the old
card, which would describe the previous version, is removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from askexpert.collab.routing import NO_EXPERT, decide
from askexpert.deploy.bundle import ExportBundle, load_bundle
from askexpert.errors import UserError
from askexpert.export.int8 import model_figures, quantize, system_figures
from askexpert.export.model_card import CARD_NAME, write_model_card
from askexpert.files.atomic import staging_folder, write_json
from askexpert.files.hashing import file_sha256
from askexpert.modules.loading import load_classifier
from datamodules.partitions import Partition


@dataclass(frozen=True)
class ExportTools:
    """What `export` uses to write and check an ONNX file (askexpert/commands/export.py)."""

    export_model: Callable  # (model, path, stored_size) -> None
    compare: Callable  # (model, path, images, batch_size) -> (torch logits, onnx logits, figures)
    onnx_logits: Callable  # (path, images, batch_size) -> logits
    min_agreement: float
    atol: float = 1e-3
    report: dict | None = None  # the run's report.json, for the export's MODEL_CARD.md


def check_export_of_run(
    folder: str, class_names: list[str], partition, stored_size: int, experts: list[str], routing=None
) -> ExportBundle:
    """The export in `folder`, refused unless it was exported from this run (classes, partition, image size and
    the very expert checkpoints: their SHA-256 in the manifest) with the routing adapt chooses τ for (gate, top-k,
    fusion: a τ chosen for one gate means nothing under another)."""
    bundle = load_bundle(folder)
    manifest = bundle.manifest
    same_partition = [sorted(map(int, e)) for e in manifest["partition"]["experts"]] == [
        sorted(e) for e in partition.experts
    ]
    hashes = [manifest["models"].get(f"expert_{i}", {}).get("checkpoint_sha256") for i in range(len(experts))]
    if bundle.class_names != list(class_names) or not same_partition or bundle.stored_size != stored_size:
        raise UserError(f"--export {folder} was not exported from this run (other classes, experts or image size)")
    if hashes != experts:
        raise UserError(f"--export {folder} holds other experts than this run's; export the run again first")
    point = manifest["operating_point"]
    if routing is not None:
        differ = [key for key in ("gate", "top_k", "fusion") if point.get(key) != getattr(routing, key)]
        if differ:
            raise UserError(
                f"--export {folder} routes with another {', '.join(differ)} than the run's report "
                f"({', '.join(f'{k} {point.get(k)!r}' for k in differ)}); export the run again first"
            )
    if manifest["operating_point"].get("second_expert"):
        # adapt chooses a one-expert τ: writing it under a two-expert point would deploy a pair nobody chose
        raise UserError(
            f"--export {folder} deploys a second expert, and adapt chooses a one-expert operating point: export "
            "the run with `export --second_expert off` to re-export into it"
        )
    return bundle


def reexport(bundle: ExportBundle, checkpoint: str, point: dict, test_set, tools: ExportTools, batch_size: int) -> str:
    """Put the generalist of `checkpoint` and the operating point `point` (threshold, temperature_value) into the
    export; returns the new version (the same one when the export holds them already: nothing is written, so edge
    clients keep their version)."""
    folder = bundle.folder
    if unchanged(bundle, checkpoint, point):
        return bundle.version
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    staging = staging_folder(folder, "adapt")  # also removes what a killed `adapt` left (`.NAME.adapt-PID`)
    shutil.copytree(folder, staging, dirs_exist_ok=True)
    try:
        manifest = _changed_manifest(bundle, staging, checkpoint, point, test_set, tools, batch_size)
        write_json(os.path.join(staging, "manifest.json"), manifest)
        if tools.report is not None:
            write_model_card(staging, manifest, tools.report, shown_as=folder)
        elif os.path.exists(os.path.join(staging, CARD_NAME)):
            os.remove(os.path.join(staging, CARD_NAME))  # it describes the previous version
        previous = os.path.join(parent, f".{name}.previous-{os.getpid()}")
        os.replace(folder, previous)  # two renames: the folder is the old export or the new one, never a mix
        try:
            os.replace(staging, folder)
        except OSError:
            os.replace(previous, folder)  # put the old export back: never leave no export at all
            raise
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_bundle(folder).version


def unchanged(bundle: ExportBundle, checkpoint: str, point: dict) -> bool:
    """Whether the export already holds this generalist checkpoint at this operating point."""
    op = bundle.manifest["operating_point"]
    same_point = op.get("threshold") == float(point["threshold"])
    same_point &= op.get("temperature_value") == float(point["temperature_value"])
    held = bundle.manifest["models"]["generalist"].get("checkpoint_sha256")
    return same_point and held == file_sha256(checkpoint)


def _changed_manifest(bundle, staging, checkpoint, point, test_set, tools: ExportTools, batch_size) -> dict:
    manifest = dict(bundle.manifest)
    images, labels = test_set
    model = load_classifier(checkpoint)
    path = os.path.join(staging, "generalist.onnx")
    tools.export_model(model, path, bundle.stored_size)
    expected, got, figures = tools.compare(model, path, images, batch_size)
    if figures["max_abs_logit_diff"] > tools.atol or figures["top1_agreement"] < tools.min_agreement:
        raise UserError(
            f"the ONNX export of the adapted generalist disagrees with PyTorch (max |logit diff| "
            f"{figures['max_abs_logit_diff']:.2e}, same top-1 on {100 * figures['top1_agreement']:.2f} %); "
            "the export was left as it was"
        )
    op = {**manifest["operating_point"], "threshold": float(point["threshold"])}
    op["temperature_value"] = float(point["temperature_value"])
    coverage = Partition(manifest["partition"]["experts"], bundle.class_names).coverage()  # as the edge builds it
    decision = partial(
        decide, coverage=coverage, temperature=op["temperature_value"], gate=op["gate"], top_k=op["top_k"]
    )
    torch_routes = decision(expected).routes(op["threshold"])
    onnx_decision = decision(got)
    onnx_routes = onnx_decision.routes(op["threshold"])
    flips = int((torch_routes != onnx_routes).sum())
    if 1.0 - flips / max(1, len(images)) < tools.min_agreement:
        raise UserError(
            f"the adapted ONNX generalist routes {flips} of {len(images)} test images differently from PyTorch; "
            "the export was left as it was"
        )
    old = manifest["models"]["generalist"]
    entry = {**old, "sha256": file_sha256(path), "checkpoint_sha256": file_sha256(checkpoint), "verification": figures}
    verification = dict(manifest["verification"])
    verification["routing"] = {
        "images": len(images),
        "routing_flips": flips,
        "routing_agreement": 1.0 - flips / max(1, len(images)),
        "offloaded_torch": int((torch_routes != NO_EXPERT).sum()),
        "offloaded_onnx": int((onnx_routes != NO_EXPERT).sum()),
    }
    if "int8" in old:  # the int8 copy must be of the new weights too, with its figures measured again
        int8_path = os.path.join(staging, old["int8"]["file"])
        quantize(path, int8_path)
        int8 = tools.onnx_logits(int8_path, images, batch_size)
        entry["int8"] = {
            **old["int8"],
            "sha256": file_sha256(int8_path),
            "verification": model_figures(expected, got, int8, labels),
        }
        if "int8" in verification:
            experts = _expert_logits(bundle, staging, images, tools, batch_size)
            fp32 = {"generalist": got, **experts["fp32"]}
            int8_all = {"generalist": int8, **experts["int8"]}
            decisions = (onnx_decision, decision(int8))
            verification["int8"] = system_figures(
                fp32, int8_all, torch_routes, decisions, op["threshold"], op["fusion"], labels
            )
    manifest["models"] = {**manifest["models"], "generalist": entry}
    manifest["operating_point"] = op
    manifest["verification"] = verification
    manifest["adapted"] = {
        "previous_version": bundle.version,
        "generalist_checkpoint_sha256": entry["checkpoint_sha256"],
    }
    return manifest


def _expert_logits(bundle, staging: str, images, tools: ExportTools, batch_size: int) -> dict:
    """The experts' ONNX logits (fp32 and int8) on the test images, for the int8 system's figures."""
    found = {"fp32": {}, "int8": {}}
    for name in bundle.expert_names:
        entry = bundle.manifest["models"][name]
        found["fp32"][name] = tools.onnx_logits(os.path.join(staging, entry["file"]), images, batch_size)
        found["int8"][name] = tools.onnx_logits(os.path.join(staging, entry["int8"]["file"]), images, batch_size)
    return found

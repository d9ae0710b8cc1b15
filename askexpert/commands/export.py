"""`python -m askexpert export --run DIR --out EXPORT`: a finished run's generalist and experts as ONNX, verified.

Each model is exported whole, input pipeline included: it takes the stored uint8 images (N, 3, S, S) that an edge
device holds and sends, and resizes and normalises them inside the graph as the PyTorch module does, so a server
or an edge client needs nothing but the file. torch's own exporter (`torch.onnx.export(dynamo=True)`) writes
them with a dynamic batch; `onnx.checker` checks them.

Verification runs every exported model with ONNX Runtime on the run's test images and compares it with PyTorch:
the largest logit difference (must be within `--atol`), the share of images with the same top-1 (each model),
and the share with the same routing decision (offload or not, and to which expert) at the run's operating point.
Below 99.9 % on either share the export is refused: a flipped gate changes what is offloaded. Nothing is written
unless every model passes (the folder is built aside and renamed into place).

EXPORT/manifest.json records the operating point (threshold, gate, temperature, top-k, fusion), the partition,
the class names, every model's file, SHA-256, input and output, the verification figures and package versions.
EXPORT/MODEL_CARD.md describes the export from the manifest and the run's report.json (askexpert/export/model_card.py);
it is documentation, not listed in the manifest, so it is not part of the version (the manifest's SHA-256).

A second expert (`--second_expert auto`, the default): when the run's report has a two-expert point (`evaluate
--routing.second_expert.enabled true`), that point is deployed: the operating point's threshold is its own and
`operating_point.second_expert` = {margin, fusion} tells `edge` to ask the runner-up expert too; the routing check
then counts an image whose second expert differs as a flip too. Without one (or with `off`) the key is absent and
the manifest is byte for byte what it was before the option existed, so the export's version is unchanged.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

from askexpert.collab.evaluation import check_expert_classes, package_versions
from askexpert.collab.logits import batched_logits, in_batches
from askexpert.collab.report_file import read_report
from askexpert.collab.routing import NO_EXPERT, EdgeDecision, decide
from askexpert.errors import UserError
from askexpert.export.int8 import model_figures, quantize, system_figures
from askexpert.export.model_card import write_model_card
from askexpert.files.atomic import staging_folder, write_json
from askexpert.files.hashing import file_sha256 as sha256
from askexpert.modules.loading import load_classifier
from askexpert.pipeline.finished_run import open_finished_run

FORMAT_VERSION = 1
SECOND_EXPERT_CHOICES = ("auto", "off")
MIN_AGREEMENT = 0.999  # top-1 and routing decisions: what the issue asks of an export
OPSET = 18


def parser():
    from askexpert.parsers import command_parser

    p = command_parser("export", "Export a finished run's generalist and experts to ONNX, verified.", with_data=False)
    p.add_argument("--run", type=str, required=True, help="finished pipeline run folder (with report.json)")
    p.add_argument("--out", type=str, required=True, help="folder to write (must not exist, or --overwrite)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing export folder")
    p.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logit| difference ONNX vs PyTorch")
    p.add_argument("--batch_size", type=int, default=256, help="images per verification batch")
    p.add_argument("--int8", type=bool, default=False, help="also write int8 copies (dynamic quantization), measured")
    p.add_argument(
        "--second_expert",
        type=str,
        default="auto",
        help="auto: deploy the report's two-expert point when it has one; off: the one-expert point",
    )
    return p


def export_model(model, path: str, stored_size: int) -> None:
    """`model` (uint8 images in, logits out) as an ONNX file with a dynamic batch dimension."""
    example = torch.zeros(2, 3, stored_size, stored_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecation chatter
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: batch}},
            external_data=False,  # one self-contained file per model (its hash covers the weights)
            verbose=False,
        )
    import onnx

    onnx.checker.check_model(path, full_check=True)


def onnx_logits(path: str, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return batched_logits(
        lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), in_batches(images, batch_size)
    )


def compare(model, path: str, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(PyTorch logits, ONNX Runtime logits, agreement figures) of one model on `images`."""
    expected = batched_logits(model, in_batches(images, batch_size))
    got = onnx_logits(path, images, batch_size)
    same = (expected.argmax(-1) == got.argmax(-1)).float()
    figures = {
        "images": len(images),
        "max_abs_logit_diff": float((expected - got).abs().max()) if len(images) else 0.0,
        "top1_agreement": float(same.mean()) if len(images) else 1.0,
        "top1_flips": int((1 - same).sum()),
    }
    return expected, got, figures


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise UserError(f"--out {out} is a file; give a folder to write the export into")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out {out} already holds files; pass --overwrite true to replace it")


def run(argv: list[str]) -> dict:
    from datamodules.datamodule import ImageDataModule

    args = parser().parse_args(argv)
    if args.atol <= 0 or args.batch_size < 1:
        raise UserError("--atol must be positive and --batch_size at least 1")
    if args.second_expert not in SECOND_EXPERT_CHOICES:
        raise UserError(f"--second_expert must be auto or off, got {args.second_expert!r}")
    _check_out(args.out, args.overwrite)
    finished = open_finished_run(args.run)
    routing, threshold = finished.operating_point(second_expert=args.second_expert == "auto")
    if routing.get("second_expert") is None:
        routing.pop("second_expert", None)  # one expert: the manifest (and so the version) as before the option
    partition = finished.partition()
    datamodule = ImageDataModule(**finished.settings.data.as_dict())
    images, labels = datamodule.tensors("test")[:2]
    stored = int(images.shape[-1])
    layout, family = finished.layout, finished.settings.specialization
    models = {"generalist": layout.best(layout.stage_dir("generalist"))}
    models.update({f"expert_{i}": layout.best(layout.expert_dir(family, i)) for i in range(partition.num_experts)})

    # built aside and renamed into place; removed on any error, SIGTERM or SIGINT (the `finally`), and a folder a
    # killed export left is removed by the next one
    staging = staging_folder(args.out)
    try:
        sources = (partition, layout.partition)
        manifest = _export_all(models, sources, routing, threshold, (images, labels), stored, staging, args)
        manifest["class_names"] = list(datamodule.class_names)
        write_json(os.path.join(staging, "manifest.json"), manifest)
        write_model_card(staging, manifest, read_report(args.run), shown_as=args.out, run=args.run)
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        os.replace(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(manifest, args.out)
    return manifest


def _export_all(models, partition_and_file, routing, threshold, test_set, stored, staging, args) -> dict:
    """Export and verify every model into `staging`; the manifest (all but the class names)."""
    partition = partition_and_file[0]
    entries, logits, int8_logits = {}, {}, {}
    for name, checkpoint in models.items():
        entries[name], logits[name], int8 = _export_model(
            name, checkpoint, partition_and_file, test_set, stored, staging, args
        )
        if int8 is not None:
            int8_logits[name] = int8
    return {
        "format_version": FORMAT_VERSION,
        "operating_point": {"threshold": threshold, **routing},
        "partition": {"num_experts": partition.num_experts, "experts": [list(e) for e in partition.experts]},
        "models": entries,
        "verification": _verify_routing(logits, int8_logits, routing, threshold, partition.coverage(), test_set, args),
        "packages": {**package_versions(), **_onnx_versions()},
    }


def _export_model(name: str, checkpoint: str, partition_and_file, test_set, stored: int, staging: str, args):
    """Export one model into `staging` and check it against PyTorch (refused beyond --atol or MIN_AGREEMENT).

    Returns its manifest entry, its (PyTorch, ONNX) test logits and, with --int8, its int8 copy's test logits."""
    partition, partition_file = partition_and_file
    images, labels = test_set
    model = load_classifier(checkpoint)
    expert = None if name == "generalist" else int(name.split("_")[1])
    if expert is not None:
        check_expert_classes(model.hparams.get("subset"), partition, expert, name, partition_file)
    path = os.path.join(staging, f"{name}.onnx")
    print(f"exporting {name} ({model.hparams.model_name}) ...", flush=True)
    export_model(model, path, stored)
    expected, got, figures = compare(model, path, images, args.batch_size)
    if figures["max_abs_logit_diff"] > args.atol or figures["top1_agreement"] < MIN_AGREEMENT:
        raise UserError(
            f"the ONNX export of {name} disagrees with PyTorch: max |logit diff| "
            f"{figures['max_abs_logit_diff']:.2e} (allowed {args.atol:g}), same top-1 on "
            f"{100 * figures['top1_agreement']:.2f} % of {figures['images']} test images (needed "
            f"{100 * MIN_AGREEMENT:.1f} %); nothing was written"
        )
    h = model.hparams
    entry = {
        "file": f"{name}.onnx",
        "sha256": sha256(path),
        "model_name": h.model_name,
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, stored, stored]},
        "output": {"name": "logits", "shape": ["batch", int(model.num_outputs)]},
        "model_image_size": int(h.get("image_size", 32)),
        "checkpoint_sha256": sha256(checkpoint),
        "verification": figures,
    }
    if expert is not None:
        entry.update(subset=sorted(int(c) for c in h.subset), other_output=bool(h.get("other_output")))
    if not args.int8:
        return entry, (expected, got), None
    int8_path = os.path.join(staging, f"{name}.int8.onnx")
    quantize(path, int8_path)
    int8 = onnx_logits(int8_path, images, args.batch_size)
    inside = None if expert is None else partition.coverage()[expert][labels]
    entry["int8"] = {
        "file": f"{name}.int8.onnx",
        "sha256": sha256(int8_path),
        "verification": model_figures(expected, got, int8, labels, inside),
    }
    return entry, (expected, got), int8


def _routes(decision: EdgeDecision, threshold: float, pair: dict | None):
    """(routes, second routes) of `decision`: the second routes are all NO_EXPERT without a second expert."""
    return decision.routes(threshold), decision.second_routes(threshold, pair["margin"] if pair else None)


def _verify_routing(logits: dict, int8_logits: dict, routing: dict, threshold: float, coverage, test_set, args) -> dict:
    """The ONNX generalist's routing decisions against PyTorch's (refused below MIN_AGREEMENT), and with --int8 the
    int8 system's figures. A decision is the expert and, with a second expert, the second one: either differing
    is a flip (it changes which experts answer)."""
    images, labels = test_set
    point = (routing["temperature_value"], routing["gate"], routing["top_k"])
    pair = routing.get("second_expert")
    torch_routes, torch_second = _routes(decide(logits["generalist"][0], coverage, *point), threshold, pair)
    onnx_decision = decide(logits["generalist"][1], coverage, *point)
    onnx_routes, onnx_second = _routes(onnx_decision, threshold, pair)
    flips = int(((torch_routes != onnx_routes) | (torch_second != onnx_second)).sum())
    gate = {
        "images": len(images),
        "routing_flips": flips,
        "routing_agreement": 1.0 - flips / max(1, len(images)),
        "offloaded_torch": int((torch_routes != NO_EXPERT).sum()),
        "offloaded_onnx": int((onnx_routes != NO_EXPERT).sum()),
    }
    if pair is not None:  # only then: a one-expert manifest stays as it was
        gate["second_routing_flips"] = int((torch_second != onnx_second).sum())
        gate["asked_two_torch"] = int((torch_second != NO_EXPERT).sum())
        gate["asked_two_onnx"] = int((onnx_second != NO_EXPERT).sum())
    if gate["routing_agreement"] < MIN_AGREEMENT:
        raise UserError(
            f"the ONNX generalist routes {flips} of {len(images)} test images differently from PyTorch "
            f"(needed {100 * MIN_AGREEMENT:.1f} % the same); nothing was written"
        )
    verification = {"atol": args.atol, "min_agreement": MIN_AGREEMENT, "routing": gate}
    if args.int8:
        int8_decision = decide(int8_logits["generalist"], coverage, *point)
        fp32 = {name: got for name, (_, got) in logits.items()}
        decisions = (onnx_decision, int8_decision)
        verification["int8"] = system_figures(
            fp32, int8_logits, torch_routes, decisions, threshold, routing["fusion"], labels, pair, torch_second
        )
    return verification


def _onnx_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _print_summary(manifest: dict, out: str) -> None:
    for name, entry in manifest["models"].items():
        v = entry["verification"]
        print(
            f"{name}: same top-1 on {100 * v['top1_agreement']:.2f} % of {v['images']} test images, "
            f"max |logit diff| {v['max_abs_logit_diff']:.1e}"
        )
    gate = manifest["verification"]["routing"]
    pair = manifest["operating_point"].get("second_expert")
    two = f", {gate['asked_two_onnx']} of them to two experts" if pair else ""
    print(
        f"routing: {gate['routing_flips']} of {gate['images']} test images routed differently "
        f"({gate['offloaded_onnx']} offloaded with ONNX{two}, {gate['offloaded_torch']} with PyTorch) -> {out}"
    )
    if pair:
        point = manifest["operating_point"]
        print(
            f"deployed the two-expert point: threshold {point['threshold']:.2f}, margin {pair['margin']:.2f}, "
            f"`{pair['fusion']}` fusion (--second_expert off deploys the one-expert point)"
        )
    if "int8" not in manifest["verification"]:
        return
    for name, entry in manifest["models"].items():
        v = entry["int8"]["verification"]
        print(
            f"{name} int8: same top-1 as PyTorch on {100 * v['top1_agreement']:.2f} %, max |logit diff| "
            f"{v['max_abs_logit_diff']:.1e}, accuracy {100 * v['accuracy_fp32']:.2f} -> "
            f"{100 * v['accuracy_int8']:.2f} % on {v['accuracy_images']} images "
            f"({v['accuracy_change_points']:+.2f} points)"
        )
    v = manifest["verification"]["int8"]
    print(
        f"int8 system: {v['routing_flips']} of {v['images']} test images routed differently from PyTorch; "
        f"accuracy {100 * v['system_accuracy_fp32']:.2f} -> {100 * v['system_accuracy_int8']:.2f} % "
        f"({v['system_accuracy_change_points']:+.2f} points)"
    )

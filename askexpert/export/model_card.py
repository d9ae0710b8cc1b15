"""MODEL_CARD.md: what an export holds, how well it did and how to serve it, written beside its manifest.

`export` writes it into every export folder, and `adapt --export` writes it again when it re-exports the
generalist (the card names the version it describes). Every figure comes from the export's manifest and files
(models, file sizes, operating point, verification) and from the run's report.json (data, accuracies, offload,
latency and energy at the operating point, the device profile): nothing is typed in here.

The front matter is a Hugging Face model card's (license, tags, library_name, datasets, metrics, model-index).

The card is derived documentation, not part of the export's identity: the version is the SHA-256 of
manifest.json alone (askexpert/deploy/bundle.py), the manifest does not list the card, and the server and the
edge client never read it. Adding, editing or deleting the card changes no version and no hash check.
"""

from __future__ import annotations

import hashlib
import os

import yaml

from askexpert.files.atomic import atomic_write_text

CARD_NAME = "MODEL_CARD.md"
STAND_IN_LABEL = "STAND-IN synthetic data, not CIFAR-100"
# the Hugging Face Hub's copy of CIFAR-100, for the `datasets` key of a real CIFAR-100 run
HUB_DATASETS = {"cifar100": "uoft-cs/cifar100"}
SYSTEM_KEYS = ("acc", "offload_ratio", "latency_ms", "energy_mj", "system_energy_mj", "routing_acc")


def manifest_version(folder: str) -> str:
    """The export's version as the server and the edge client compute it (askexpert/deploy/bundle.py)."""
    with open(os.path.join(folder, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def write_model_card(folder: str, manifest: dict, report: dict, shown_as: str | None = None, run: str | None = None):
    """Write `folder`/MODEL_CARD.md (after its manifest.json); `shown_as` is the folder as the commands in the card
    name it (default: `folder`), `run` the run folder the export came from. Returns the card's path."""
    path = os.path.join(folder, CARD_NAME)
    atomic_write_text(path, render_model_card(folder, manifest, report, shown_as or folder, run))
    return path


def deployed_point(manifest: dict, report: dict) -> tuple[str, dict]:
    """(where in the report, the report's figures) of the operating point the export deploys: the two-expert point
    when the manifest asks a second expert, else the selected one."""
    if manifest["operating_point"].get("second_expert") is not None and report.get("second_expert"):
        return "second_expert", report["second_expert"]
    return "selected", report.get("selected") or {}


def front_matter(manifest: dict, report: dict, version: str) -> dict:
    data = report.get("data") or {}
    stand_in = bool(data.get("stand_in"))
    source = str(data.get("source", "unknown"))
    _, point = deployed_point(manifest, report)
    dataset_name = STAND_IN_LABEL if stand_in else f"{source} data"
    metrics = [
        {"type": "accuracy", "name": "system accuracy (test, at the operating point)", "value": point.get("acc")},
        {"type": "offload_ratio", "name": "share of test images offloaded", "value": point.get("offload_ratio")},
        {
            "type": "accuracy",
            "name": "generalist accuracy (test)",
            "value": (report.get("generalist") or {}).get("test_acc"),
        },
    ]
    for i, expert in enumerate(report.get("experts") or []):
        value = expert.get("subset_test_acc")
        metrics.append({"type": "accuracy", "name": f"expert_{i} accuracy (test, its own classes)", "value": value})
    metrics = [m for m in metrics if m["value"] is not None]
    tags = [
        "askexpert",
        "onnx",
        "image-classification",
        "vision-transformer",
        "edge-inference",
        "collaborative-inference",
    ]
    if stand_in:
        tags.append("stand-in-data")
    card = {
        "license": "unknown",
        "library_name": "onnx",
        "pipeline_tag": "image-classification",
        "tags": tags,
        "datasets": [] if stand_in or source not in HUB_DATASETS else [HUB_DATASETS[source]],
        "metrics": sorted({m["type"] for m in metrics}),
        "model-index": [
            {
                "name": f"askexpert-{version}",
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset_name, "type": source},
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    return card


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * float(value):.2f} %"


def _num(value, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}{unit}"


def _diff(value) -> str:
    return "n/a" if value is None else f"{float(value):.1e}"


def _size(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return "n/a"
    size = os.path.getsize(path)
    return f"{size / 1e6:.2f} MB ({size:,} bytes)"


def _report_models(report: dict) -> dict:
    """The report's model records by the manifest's names (generalist, expert_0, ...)."""
    found = {"generalist": report.get("generalist") or {}}
    found.update({f"expert_{i}": e for i, e in enumerate(report.get("experts") or [])})
    return found


def _models_section(folder: str, manifest: dict, report: dict) -> list[str]:
    known = _report_models(report)
    int8 = any("int8" in e for e in manifest["models"].values())
    head = "| model | architecture | parameters | input (uint8) | outputs | ONNX file | size |"
    lines = ["## Models", "", head + (" int8 file | int8 size |" if int8 else ""), "|" + "---|" * (7 + 2 * int8)]
    for name, entry in manifest["models"].items():
        record = known.get(name, {})
        # the report's parameter count is of the run's model: only when the architecture is the same one
        params = record.get("params") if record.get("model_name") == entry.get("model_name") else None
        shape = "x".join(str(d) for d in entry["input"]["shape"])
        row = (
            f"| {name} | {entry.get('model_name', 'n/a')} | {'n/a' if params is None else f'{int(params):,}'} "
            f"| {shape} | {entry['output']['shape'][-1]} | {entry['file']} | {_size(folder, entry['file'])} |"
        )
        if int8:
            file = entry.get("int8", {}).get("file")
            row += f" {file or 'n/a'} | {_size(folder, file) if file else 'n/a'} |"
        lines.append(row)
    lines += [
        "",
        "Parameters: the run's report (`report.json`); outputs: logits per image; file sizes: the files in this "
        "folder; every file's SHA-256 is in manifest.json.",
    ]
    return lines


def _data_section(manifest: dict, report: dict) -> list[str]:
    data = report.get("data") or {}
    partition = report.get("partition") or {}
    experts = manifest["partition"]["experts"]
    label = STAND_IN_LABEL if data.get("stand_in") else f"{data.get('source', 'unknown')} data"
    lines = ["## Training data", ""]
    if data.get("stand_in"):
        lines += [
            f"**{label}.** The run trained and was tested on askexpert's stand-in images: synthetic images "
            "under CIFAR-100's class names. Every figure in this card is a stand-in figure.",
            "",
        ]
    lines += [
        f"- source: `{data.get('source', 'n/a')}` ({label}), {data.get('num_classes', 'n/a')} classes",
        f"- images: {data.get('train_size', 'n/a')} train, {data.get('val_size', 'n/a')} validation, "
        f"{data.get('test_size', 'n/a')} test",
        f"- partition: {len(experts)} experts ({partition.get('method', 'n/a')}), "
        + ", ".join(f"expert_{i}: {len(e)} classes" for i, e in enumerate(experts)),
    ]
    return lines


def _metrics_section(manifest: dict, report: dict) -> list[str]:
    known = _report_models(report)
    key, point = deployed_point(manifest, report)
    lines = [
        "## Metrics",
        "",
        "From the run's `report.json` (test split) and the export's verification (manifest.json: ONNX Runtime "
        "against PyTorch).",
        "",
        "| model | test accuracy | on its own classes | generalist on those classes | same top-1 as PyTorch "
        "| max abs logit diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in manifest["models"].items():
        record, v = known.get(name, {}), entry.get("verification", {})
        lines.append(
            f"| {name} | {_pct(record.get('test_acc'))} | {_pct(record.get('subset_test_acc'))} "
            f"| {_pct(record.get('generalist_subset_test_acc'))} | {_pct(v.get('top1_agreement'))} "
            f"| {_diff(v.get('max_abs_logit_diff'))} |"
        )
    costs = (report.get("costs") or {}).get("profile") or {}
    baselines = report.get("baselines") or {}
    routing = manifest["verification"].get("routing", {})
    adapted = manifest.get("adapted")
    lines += [
        "",
        f"**System** at the operating point (report's `{key}`, chosen on {point.get('chosen_on', 'n/a')}):",
        "",
        f"- accuracy: {_pct(point.get('acc'))} (edge only: {_pct(baselines.get('edge_only', {}).get('acc'))}, "
        f"everything offloaded: {_pct(baselines.get('full_offload', {}).get('acc'))})",
        f"- offloaded: {_pct(point.get('offload_ratio'))} of the test images"
        + (f", {_pct(point.get('second_ratio'))} to two experts" if point.get("second_ratio") is not None else ""),
        f"- routing accuracy (the expert asked owns the true class): {_pct(point.get('routing_acc'))}",
        f"- latency per image: {_num(point.get('latency_ms'), ' ms')}; energy on the edge device: "
        f"{_num(point.get('energy_mj'), ' mJ')}, whole system: {_num(point.get('system_energy_mj'), ' mJ')} "
        f"(cost model with the `{costs.get('name', 'n/a')}` device profile: modelled, not measured)",
        f"- routing decisions of the ONNX generalist vs PyTorch: {routing.get('routing_flips', 'n/a')} of "
        f"{routing.get('images', 'n/a')} test images differ",
    ]
    if "int8" in manifest["verification"]:
        v = manifest["verification"]["int8"]
        lines.append(
            f"- int8 copies: system accuracy {_pct(v.get('system_accuracy_fp32'))} -> "
            f"{_pct(v.get('system_accuracy_int8'))}, {v.get('routing_flips', 'n/a')} routing decisions changed"
        )
    if adapted:
        previous = adapted.get("previous_version")
        lines += [
            "",
            f"The generalist was adapted (`adapt --export`, previous version {previous}): the system figures "
            "above are the run's report, measured before adaptation at the report's operating point; the adapted "
            "generalist's are in its adapt folder's adapt.csv.",
        ]
    return lines


def _operating_point_section(manifest: dict) -> list[str]:
    op = manifest["operating_point"]
    pair = op.get("second_expert")
    second = "none (one expert per offloaded image)"
    if pair:
        second = f"asked when its score is within margin {pair['margin']:.4f} of the first's; `{pair['fusion']}` fusion"
    return [
        "## Operating point (manifest.json)",
        "",
        f"- gate: `{op['gate']}`, threshold τ = {op['threshold']:.4f} (offload when the gate's confidence is below it)",
        f"- temperature: {op['temperature_value']:.4f}",
        f"- top-k: {op['top_k']}",
        f"- fusion: `{op['fusion']}`",
        f"- second expert: {second}",
    ]


def _use_section(report: dict) -> list[str]:
    data = report.get("data") or {}
    profile = (report.get("costs") or {}).get("profile") or {}
    lines = [
        "## Intended use and limits",
        "",
        "- A research prototype of collaborative edge / near-edge inference: the generalist runs on the edge "
        "device and sends the images it is unsure of to the experts on a near-edge server. Not for decisions "
        "about people, safety or anything that matters; not evaluated for robustness, fairness or drift.",
        f"- Device assumptions: the `{profile.get('name', 'n/a')}` profile: edge {profile.get('edge', 'n/a')}, "
        f"near-edge {profile.get('near_edge', 'n/a')}, link {profile.get('link', 'n/a')}. Latency and energy are "
        "modelled from it; figures the profile marks (assumption) are not measurements.",
        "- License: unknown. The weights' terms follow from the training data and, for a pretrained model, from "
        "its pretrained weights; they have not been reviewed.",
    ]
    if data.get("stand_in"):
        lines.append(
            f"- **{STAND_IN_LABEL}**: the numbers in this card are stand-in numbers, not CIFAR-100 "
            "numbers; they say the pipeline runs, not how well the method works on real images."
        )
    findings = report.get("findings") or []
    if findings:
        lines += ["- The run's own checks (report.json `findings`):"]
        lines += [f"  - {f.get('message', f.get('check', ''))}" for f in findings]
    return lines


def _serve_section(manifest: dict, shown_as: str) -> list[str]:
    int8 = all("int8" in e for e in manifest["models"].values())
    lines = [
        "## How to serve it",
        "",
        "```bash",
        f"python -m askexpert serve --export {shown_as} --port 8000                 # experts, on the server",
        f"python -m askexpert edge --export {shown_as} --server http://SERVER:8000 \\",
        "    --images IMAGES/ --out preds.csv                                        # generalist, on the edge",
        "```",
        "",
        "On a non-loopback address `serve` needs a token (`--host 0.0.0.0` with `ASKEXPERT_TOKEN` set, the same "
        "for `edge`). In a container (deploy/Dockerfile, torch-free):",
        "",
        "```bash",
        f"docker run --rm -p 8000:8000 -e ASKEXPERT_TOKEN -v {os.path.abspath(shown_as)}:/export:ro askexpert-serve",
        "```",
    ]
    if int8:
        lines += ["", "`--precision int8` on both commands runs the int8 copies."]
    return lines


def render_model_card(folder: str, manifest: dict, report: dict, shown_as: str, run: str | None = None) -> str:
    version = manifest_version(folder)
    matter = yaml.safe_dump(front_matter(manifest, report, version), sort_keys=False, allow_unicode=True)
    data = report.get("data") or {}
    title = "# askexpert export" + (" (STAND-IN data, not CIFAR-100)" if data.get("stand_in") else "")
    provenance = report.get("provenance") or {}
    about = [
        title,
        "",
        f"Version `{version}` (the first 12 hex digits of manifest.json's SHA-256; this card is not part of it)"
        + (f", exported from the run `{os.path.abspath(run)}`" if run else "")
        + f"; seed {provenance.get('seed', 'n/a')}, git revision {provenance.get('git_revision', 'n/a')}. "
        "Written by `python -m askexpert export` from manifest.json and the run's report.json.",
    ]
    sections = [
        about,
        _models_section(folder, manifest, report),
        _data_section(manifest, report),
        _metrics_section(manifest, report),
        _operating_point_section(manifest),
        _use_section(report),
        _serve_section(manifest, shown_as),
    ]
    return f"---\n{matter}---\n\n" + "\n\n".join("\n".join(s) for s in sections) + "\n"

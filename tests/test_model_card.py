"""MODEL_CARD.md: written with every export (and again by adapt's re-export), every figure from the run's files."""

from __future__ import annotations

import json
import shutil

import yaml
from helpers.processes import dead_pid

from askexpert.adapt.reexport import ExportTools, reexport
from askexpert.commands import export as export_command
from askexpert.deploy.bundle import load_bundle
from askexpert.export.model_card import CARD_NAME, STAND_IN_LABEL
from askexpert.pipeline.finished_run import open_finished_run
from datamodules.datamodule import ImageDataModule


def card_parts(folder) -> tuple[dict, str]:
    text = (folder / CARD_NAME).read_text()
    assert text.startswith("---\n")
    matter, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(matter), body


def test_every_export_has_a_card_with_the_runs_figures(tiny_pipeline_run, tiny_export) -> None:
    _, run = tiny_pipeline_run
    out, manifest = tiny_export
    report = json.loads((run / "report.json").read_text())
    matter, body = card_parts(out)
    assert matter["license"] == "unknown" and matter["library_name"] == "onnx" and "onnx" in matter["tags"]
    assert report["data"]["stand_in"]  # the tiny run is on stand-in data: the card must say so everywhere
    assert "stand-in-data" in matter["tags"] and matter["datasets"] == []
    result = matter["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == STAND_IN_LABEL
    assert f"**{STAND_IN_LABEL}.**" in body and "not CIFAR-100 numbers" in body
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    selected = report["selected"]
    assert metrics["system accuracy (test, at the operating point)"] == selected["acc"]
    assert metrics["share of test images offloaded"] == selected["offload_ratio"]
    assert metrics["generalist accuracy (test)"] == report["generalist"]["test_acc"]
    for i, expert in enumerate(report["experts"]):
        assert metrics[f"expert_{i} accuracy (test, its own classes)"] == expert["subset_test_acc"]
    # the body: the same figures, rounded as printed
    version = load_bundle(str(out)).version
    assert matter["model-index"][0]["name"] == f"askexpert-{version}" and f"Version `{version}`" in body
    assert f"- accuracy: {100 * selected['acc']:.2f} %" in body
    assert f"- offloaded: {100 * selected['offload_ratio']:.2f} % of the test images" in body
    assert f"latency per image: {selected['latency_ms']:.2f} ms" in body
    assert f"energy on the edge device: {selected['energy_mj']:.2f} mJ" in body
    assert f"`{report['costs']['profile']['name']}` device profile" in body
    assert f"edge {report['costs']['profile']['edge']}" in body
    point = manifest["operating_point"]
    assert f"threshold τ = {point['threshold']:.4f}" in body and f"top-k: {point['top_k']}" in body
    assert f"gate: `{point['gate']}`" in body and f"fusion: `{point['fusion']}`" in body
    for name, entry in manifest["models"].items():
        size = (out / entry["file"]).stat().st_size
        params = report["generalist"]["params"] if name == "generalist" else report["experts"][int(name[-1])]["params"]
        assert f"| {name} | {entry['model_name']} | {params:,} |" in body and f"({size:,} bytes)" in body
        assert f"({(out / entry['int8']['file']).stat().st_size:,} bytes)" in body
    assert f"python -m askexpert serve --export {out} --port 8000" in body
    assert f"python -m askexpert edge --export {out} --server http://SERVER:8000" in body
    assert "--precision int8" in body


def test_the_card_is_not_part_of_the_version(tiny_export, tmp_path) -> None:
    """The card is derived documentation: the version hashes manifest.json alone, which does not list the card."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export[0], folder)
    version = load_bundle(str(folder)).version
    assert CARD_NAME not in (folder / "manifest.json").read_text()
    (folder / CARD_NAME).write_text("edited\n")
    assert load_bundle(str(folder)).version == version
    (folder / CARD_NAME).unlink()
    assert load_bundle(str(folder)).version == version


def test_a_reexport_writes_the_card_of_the_new_version(tiny_pipeline_run, tiny_export, tmp_path) -> None:
    _, run = tiny_pipeline_run
    folder = tmp_path / "export"
    shutil.copytree(tiny_export[0], folder)
    report = json.loads((run / "report.json").read_text())
    finished = open_finished_run(str(run))
    checkpoint = finished.layout.best(finished.layout.stage_dir("generalist"))
    test_set = ImageDataModule(**finished.settings.data.as_dict()).tensors("test")[:2]
    e = export_command
    tools = ExportTools(e.export_model, e.compare, e.onnx_logits, e.MIN_AGREEMENT, report=report)
    old = load_bundle(str(folder))
    point = {"threshold": old.operating_point["threshold"] + 0.01, "temperature_value": 1.0}
    left_by_a_killed_adapt = tmp_path / f".export.adapt-{dead_pid()}"
    left_by_a_killed_adapt.mkdir()
    new = reexport(old, checkpoint, point, test_set, tools, 256)
    assert new != old.version
    assert not left_by_a_killed_adapt.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    matter, body = card_parts(folder)
    assert matter["model-index"][0]["name"] == f"askexpert-{new}" and f"Version `{new}`" in body
    assert f"threshold τ = {point['threshold']:.4f}" in body and "temperature: 1.0000" in body
    assert f"previous version {old.version}" in body and "measured before adaptation" in body
    # without the run's report the card would describe the previous version: it is removed, not left stale
    tools = ExportTools(e.export_model, e.compare, e.onnx_logits, e.MIN_AGREEMENT)
    reexport(load_bundle(str(folder)), checkpoint, {**point, "temperature_value": 0.5}, test_set, tools, 256)
    assert not (folder / CARD_NAME).exists()

"""The report's plots (`collab/plots.py`) and the data they draw (`collab/diagnostics.py`): the PNGs next to
report.md and linked from it, the ECE before and after temperature scaling, the routing counts."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from PIL import Image

from askexpert.collab import plots
from askexpert.collab.diagnostics import reliability, reliability_bins, routing_counts
from askexpert.collab.report import log_to_wandb, markdown, write_report
from askexpert.collab.routing import NO_EXPERT, fit_temperature


def overconfident(n: int = 2000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that are right about 60 % of the time but put almost all their mass on their answer."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    answer = torch.where(
        torch.rand(n, generator=generator) < 0.6, labels, torch.randint(classes, (n,), generator=generator)
    )
    logits = torch.randn(n, classes, generator=generator)
    logits[torch.arange(n), answer] += 8.0
    return logits, labels


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model() -> None:
    logits, labels = overconfident()
    temperature = fit_temperature(logits[:1000], labels[:1000])
    assert temperature > 1.0
    found = reliability(logits[1000:], labels[1000:], temperature, "test", "val")
    assert found["ece_after"] <= found["ece_before"]
    assert found["ece_before"] > 0.2  # 60 % right at ~99 % confidence
    for key in ("before", "after"):
        bins = found["bins"][key]
        assert len(bins) == found["num_bins"] and sum(b["count"] for b in bins) == 1000


def test_the_ece_is_the_weighted_gap_between_confidence_and_accuracy() -> None:
    # two images, both at confidence ~0.73 (one bin): one right, one wrong -> |0.5 - 0.73|
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    found = reliability_bins(logits, torch.tensor([0, 1]), 1.0, 10)
    confidence = float(torch.tensor([1.0, 0.0]).softmax(-1)[0])
    assert found["ece"] == pytest.approx(abs(0.5 - confidence))
    assert [b["count"] for b in found["bins"]] == [0] * 7 + [2] + [0] * 2


def test_routing_counts_sum_to_the_offloaded_images() -> None:
    routes = torch.tensor([0, NO_EXPERT, 1, 1, NO_EXPERT, 0, 2])
    labels = torch.tensor([0, 1, 2, 2, 3, 3, 0])
    counts = routing_counts(routes, labels, num_classes=4, num_experts=3)
    assert sum(map(sum, counts)) == int((routes != NO_EXPERT).sum()) == 5
    assert counts[2] == [0, 2, 0] and counts[0] == [1, 0, 1] and counts[1] == [0, 0, 0]


pytestmark = pytest.mark.usefixtures("plots_on")  # the suite turns the plots off elsewhere (tests/conftest.py)


def test_without_plots_a_report_has_only_its_pareto_front(tiny_pipeline_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ASKEXPERT_REPORT_PLOTS", "0")
    _, run = tiny_pipeline_run
    paths = write_report(json.loads((run / "report.json").read_text()), str(tmp_path), run_dir=str(run))
    assert set(paths) == {"report.json", "report.md", "pareto.png"}
    assert "## Plots" not in (tmp_path / "report.md").read_text()


def _is_png(path, min_side: int = 200) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side and max(image.size) <= 4000


def test_a_pipeline_run_writes_and_links_every_plot(tiny_pipeline_run, tmp_path) -> None:
    _, run = tiny_pipeline_run
    report = json.loads((run / "report.json").read_text())
    write_report(report, str(tmp_path), run_dir=str(run))  # the run's report, with the plots (on in this file)
    text = (tmp_path / "report.md").read_text()
    for name in plots.PLOT_FILES:
        _is_png(tmp_path / name)
        assert f"]({name})" in text
    assert "ECE" in text and "before temperature scaling" in text
    found = report["reliability"]
    assert found["split"] == "test" and found["images"] == report["data"]["test_size"]
    assert found["temperature"] == report["routing"]["temperature_value"]
    counts = report["routing_counts"]
    assert sum(map(sum, counts["counts"])) == counts["offloaded"]
    assert counts["offloaded"] == round(report["selected"]["offload_ratio"] * report["data"]["test_size"])
    assert len(counts["counts"]) == report["data"]["num_classes"]
    assert counts["threshold"] == report["selected"]["threshold"]


def test_an_old_report_and_a_folder_without_stages_get_only_what_they_have(tiny_pipeline_run, tmp_path) -> None:
    """A report without the new entries and a folder without metrics.csv: no such plot, no link, no error."""
    _, run = tiny_pipeline_run
    report = json.loads((run / "report.json").read_text())
    del report["reliability"], report["routing_counts"]
    paths = write_report(report, str(tmp_path))
    assert set(paths) == {"report.json", "report.md", "pareto.png", "experts_vs_generalist.png"}
    text = (tmp_path / "report.md").read_text()
    assert "](experts_vs_generalist.png)" in text and "routing.png" not in text and "ECE" not in text
    # the training curves come from the run folder when the report goes elsewhere
    paths = write_report(json.loads((run / "report.json").read_text()), str(tmp_path), run_dir=str(run))
    _is_png(paths["training_curves.png"])
    assert markdown(report).count("## Plots") == 0  # no plot written, no section


def test_the_plots_go_to_wandb(monkeypatch, tiny_pipeline_run, tmp_path) -> None:
    logged: dict = {}

    class Run:
        summary: dict = {}

        def log(self, values):
            logged.update(values)

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Table=lambda **kwargs: kwargs, Image=lambda path: path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _, run = tiny_pipeline_run
    report = json.loads((run / "report.json").read_text())
    paths = {name: str(run / name) for name in ("report.json", "report.md", "pareto.png", *plots.PLOT_FILES)}
    log_to_wandb(report, paths, str(tmp_path), "project")
    assert logged["pareto"] == paths["pareto.png"]
    for name in plots.PLOT_FILES:
        assert logged[name.removesuffix(".png")] == paths[name]

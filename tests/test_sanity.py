"""Sanity findings (`askexpert/collab/sanity.py`) on hand-made report dictionaries: each check, the edges of
each threshold, degenerate reports, and how the findings are shown (lines, report.md block, W&B summary).
The end-to-end check on a trained run is in test_pipeline.py (it reuses that module's tiny pipeline run)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from askexpert.collab import sanity
from askexpert.collab.report import ALL_PASSED, findings_lines, findings_markdown, log_to_wandb
from askexpert.collab.sanity import (
    CHANCE_STANDARD_ERRORS,
    OFFLOAD_EVERYTHING_MIN,
    OFFLOAD_NOTHING_MAX,
    chance_limit,
    findings,
)

CLASSES, IMAGES = 100, 10_000  # hand-made numbers, not measured on any data set


def expert(name: str, own: float, generalist_there: float, classes: int = 25, images: int | None = 2_500) -> dict:
    entry = {
        "name": name,
        "classes": list(range(classes)),
        "subset_test_acc": own,
        "generalist_subset_test_acc": generalist_there,
        "test_acc": own * classes / CLASSES,
    }
    if images is not None:
        entry["subset_test_images"] = images
    return entry


def healthy() -> dict:
    """A report in which every check passes: every model well above chance, base and experts above the
    generalist, a third of the images offloaded."""
    return {
        "data": {"num_classes": CLASSES, "test_size": IMAGES, "stand_in": True},
        "generalist": {"model_name": "g", "params": 1, "test_acc": 0.30},
        "base": {"model_name": "b", "params": 2, "test_acc": 0.40},
        "experts": [expert(f"progressive_{i}", 0.50, 0.30) for i in range(4)],
        "static_experts": [expert(f"static_{i}", 0.45, 0.30) for i in range(4)],
        "selected": {"threshold": 0.4, "chosen_on": "val", "acc": 0.36, "offload_ratio": 0.33},
    }


def checks(report: dict) -> list[tuple[str, str]]:
    return [(f["check"], f["subject"]) for f in findings(report)]


def test_a_healthy_report_has_no_findings():
    assert findings(healthy()) == []
    assert findings_lines(healthy()) == [ALL_PASSED]
    assert "1 %" in ALL_PASSED and "99 %" in ALL_PASSED


def test_the_diverged_gpu_run_is_flagged_everywhere():
    """The real failure: base model and three experts diverged, the operating point fell back to offload 0 %."""
    report = healthy()
    report["base"]["test_acc"] = 0.0098
    report["experts"] = [expert(f"progressive_{i}", 0.0, 0.30, classes=33, images=3_300) for i in range(3)]
    report["static_experts"] = []
    report["selected"].update(threshold=0.0, offload_ratio=0.0, acc=0.30)
    assert checks(report) == [
        ("near_chance", "base"),
        ("base_not_better", "base"),
        *[(check, f"progressive_{i}") for i in range(3) for check in ("near_chance", "expert_not_better")],
        ("offload_nothing", "selected"),
    ]
    for f in findings(report):
        assert f["message"] and "\n" not in f["message"] and set(f) == {"check", "subject", "message"}
    json.dumps(findings(report))  # report.json holds them as they are


def test_near_chance_message_has_the_numbers():
    report = healthy()
    report["base"]["test_acc"] = 0.011
    (found,) = [f for f in findings(report) if f["check"] == "near_chance"]
    assert found["subject"] == "base"
    assert found["message"] == (
        "base model: test accuracy 1.10 % is within 2 binomial standard errors of chance "
        "(1.00 % for 100 classes, 10000 images; up to 1.20 % counts as chance)"
    )


def test_near_chance_limit_is_two_binomial_standard_errors_at_chance():
    assert CHANCE_STANDARD_ERRORS == 2
    assert chance_limit(0.01, 10_000) == pytest.approx(0.01 + 2 * math.sqrt(0.01 * 0.99 / 10_000))
    assert chance_limit(0.04, 1_250) == pytest.approx(0.04 + 2 * math.sqrt(0.04 * 0.96 / 1_250))


@pytest.mark.parametrize("model", ["generalist", "base"])
def test_near_chance_boundary_for_all_class_models(model):
    limit = chance_limit(1 / CLASSES, IMAGES)
    report = healthy()
    report["base"]["test_acc"] = report["generalist"]["test_acc"] = 0.5  # keep base vs generalist out of it
    report[model]["test_acc"] = limit  # just inside: at the limit counts as chance
    assert ("near_chance", model) in checks(report)
    report[model]["test_acc"] = limit + 1e-6  # just outside
    assert ("near_chance", model) not in checks(report)


def test_a_model_below_chance_says_so():
    report = healthy()
    report["generalist"]["test_acc"] = 0.0
    (found,) = [f for f in findings(report) if f["check"] == "near_chance"]
    assert found["subject"] == "generalist" and "is below chance" in found["message"]


def test_an_expert_is_judged_against_chance_on_its_own_classes():
    """4.5 % on its 25 classes is 4.5 times the all-class chance, but a model that only knows which classes
    are its own reaches 1/25 = 4 % there: near chance for an expert."""
    limit = chance_limit(1 / 25, 2_500)
    report = healthy()
    report["experts"][1] = expert("progressive_1", limit, 0.01)
    assert checks(report) == [("near_chance", "progressive_1")]
    message = findings(report)[0]["message"]
    assert message.startswith("expert progressive_1: accuracy on its own 25 classes 4.78 % is within 2 binomial")
    assert "(4.00 % for 25 classes, 2500 images; up to 4.78 % counts as chance)" in message
    report["experts"][1] = expert("progressive_1", limit + 1e-6, 0.01)
    assert findings(report) == []


def test_static_experts_are_checked_too():
    report = healthy()
    report["static_experts"][3] = expert("static_3", 0.02, 0.30)
    assert checks(report) == [("near_chance", "static_3"), ("expert_not_better", "static_3")]


def test_an_expert_without_an_image_count_uses_its_share_of_the_test_set():
    """Reports made before `subset_test_images`: n = test images x |S| / C (balanced test sets)."""
    report = healthy()
    limit = chance_limit(1 / 25, IMAGES * 25 // CLASSES)
    report["experts"][0] = expert("progressive_0", limit, 0.01, images=None)
    assert checks(report) == [("near_chance", "progressive_0")]
    assert "2500 images" in findings(report)[0]["message"]
    report["experts"][0] = expert("progressive_0", limit + 1e-6, 0.01, images=None)
    assert findings(report) == []


def test_base_not_better_than_the_generalist_boundary():
    report = healthy()
    report["base"]["test_acc"] = 0.30  # equal: not better
    assert checks(report) == [("base_not_better", "base")]
    assert findings(report)[0]["message"].startswith(
        "base model: test accuracy 30.00 % is not better than the generalist's 30.00 % (+0.00 points)"
    )
    report["base"]["test_acc"] = 0.25
    assert "(-5.00 points)" in findings(report)[0]["message"]
    report["base"]["test_acc"] = 0.30 + 1e-9  # just better
    assert findings(report) == []


def test_expert_not_better_than_the_generalist_on_its_classes_boundary():
    report = healthy()
    report["experts"][2] = expert("progressive_2", 0.30, 0.30)
    assert checks(report) == [("expert_not_better", "progressive_2")]
    assert findings(report)[0]["message"] == (
        "expert progressive_2: accuracy on its own 25 classes 30.00 % is not better than the generalist's "
        "30.00 % on the same images (+0.00 points)"
    )
    report["experts"][2] = expert("progressive_2", 0.28, 0.30)
    assert "(-2.00 points)" in findings(report)[0]["message"]
    report["experts"][2] = expert("progressive_2", 0.30 + 1e-9, 0.30)
    assert findings(report) == []


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0.0, "offload_nothing"),
        (OFFLOAD_NOTHING_MAX, "offload_nothing"),  # at the limit: nothing
        (OFFLOAD_NOTHING_MAX + 1e-6, None),  # just above
        (0.75, None),
        (OFFLOAD_EVERYTHING_MIN - 1e-6, None),  # just below
        (OFFLOAD_EVERYTHING_MIN, "offload_everything"),
        (0.995, "offload_everything"),  # the CPU demo's operating point
        (1.0, "offload_everything"),
    ],
)
def test_operating_point_offloading_nothing_or_everything(ratio, expected):
    assert (OFFLOAD_NOTHING_MAX, OFFLOAD_EVERYTHING_MIN) == (0.01, 0.99)
    report = healthy()
    report["selected"]["offload_ratio"] = ratio
    assert checks(report) == ([] if expected is None else [(expected, "selected")])


def test_operating_point_messages():
    report = healthy()
    report["selected"].update(threshold=0.0, offload_ratio=0.0)
    assert findings(report)[0]["message"] == (
        "operating point: threshold 0.00 (chosen on val) offloads 0.0 % of the 10000 test images (1 % or less "
        "counts as nothing), so the askexpert row is the generalist alone within 0.0 points of accuracy"
    )
    report["selected"].update(threshold=0.27, offload_ratio=0.995)
    message = findings(report)[0]["message"]
    assert message.startswith("operating point: threshold 0.27 (chosen on val) offloads 99.5 % of the 10000 test")
    assert "(99 % or more counts as everything)" in message and "at most 0.5 points" in message


def test_no_experts():
    report = healthy()
    report["experts"], report["static_experts"] = [], []
    assert checks(report) == [("no_experts", "experts")]


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf"), -0.1, 1.5, "0.3", True])
def test_an_accuracy_that_is_not_a_number_is_reported_and_not_compared(bad):
    report = healthy()
    report["experts"][0]["subset_test_acc"] = bad  # e.g. NaN: none of its classes in the test split
    report["generalist"]["test_acc"] = bad
    found = checks(report)
    assert found == [("not_measured", "generalist"), ("not_measured", "progressive_0")]
    assert repr(bad) in findings(report)[0]["message"]


def test_missing_pieces_do_not_break_the_checks():
    report = healthy()
    del report["base"]  # a report without a base model
    report["experts"][0]["generalist_subset_test_acc"] = float("nan")
    report["selected"]["offload_ratio"] = float("nan")
    assert checks(report) == [("not_measured", "progressive_0"), ("not_measured", "selected")]
    assert checks({}) == [
        ("no_test_images", "data"),
        ("not_measured", "generalist"),
        ("no_experts", "experts"),
        ("not_measured", "selected"),
    ]


@pytest.mark.parametrize("data", [{"test_size": 0, "num_classes": 100}, {"test_size": 300, "num_classes": 0}])
def test_an_empty_test_split_skips_the_chance_checks(data):
    report = healthy()
    report["data"].update(data)
    report["generalist"]["test_acc"] = 0.0  # would be near chance with images
    assert checks(report) == [("no_test_images", "data")]


def test_a_one_class_expert_is_always_at_chance_on_its_class():
    """Its own-class accuracy measures nothing: a model that knows only its class is right on all of them."""
    report = healthy()
    report["experts"][0] = expert("progressive_0", 1.0, 0.30, classes=1, images=100)
    assert checks(report) == [("near_chance", "progressive_0")]
    assert "for 1 class," in findings(report)[0]["message"]


def test_findings_lines_and_markdown_block():
    report = healthy()
    assert findings_markdown(report) == ["## Sanity findings", "", f"- {ALL_PASSED}", ""]
    report["selected"]["offload_ratio"] = 1.0
    report["base"]["test_acc"] = 0.2
    lines = findings_lines(report)
    assert len(lines) == 2 and all(line.startswith("WARNING: ") for line in lines)
    assert lines[0].startswith("WARNING: base model:") and lines[1].startswith("WARNING: operating point:")
    block = findings_markdown(report)
    assert block[:4] == ["## Sanity findings", "", f"- {lines[0]}", f"- {lines[1]}"]
    assert any("docs/collaborative.md" in line for line in block)
    # a report that carries its findings is shown as it is (they were computed when it was made)
    report["findings"] = [sanity.finding("offload_everything", "selected", "as stored")]
    assert findings_lines(report) == ["WARNING: as stored"]


def test_the_findings_go_into_the_wandb_summary(monkeypatch, tmp_path):
    """`log_to_wandb` adds the count and the text to the run summary (a stand-in `wandb` module records it)."""
    summary: dict = {}

    class Run:
        def __init__(self):
            self.summary = summary

        def log(self, values):
            pass

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Table=lambda **kwargs: kwargs, Image=lambda path: path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    report = healthy()
    point = {"acc": 0.3, "offload_ratio": 0.0, "latency_ms": 1.0, "energy_mj": 1.0, "system_energy_mj": 1.0}
    report["selected"] |= point  # offloads nothing: one finding
    report |= {"routing": {}, "sweep": [{"threshold": 0.0, **point}], "baselines": {"edge_only": point}}
    log_to_wandb(report, {"pareto.png": "p.png"}, str(tmp_path), "project")
    assert summary["findings/count"] == 1
    assert summary["findings/text"].startswith("WARNING: operating point: threshold 0.40")

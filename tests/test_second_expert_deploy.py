"""The second expert deployed: `route`, `export` and `edge` ask the runner-up expert too, and decide alike.

One copy of the session's tiny run is evaluated with a two-expert point (τ = 1 and margin 0.5 fixed, so that many
test images are offloaded and many of those split between the two experts), exported once, and served once.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.cli import one_line, run_main
from test_deploy import Server, predict_total

from askexpert.cli import cli_main
from askexpert.collab.logits import batched_logits, in_batches
from askexpert.collab.routing import NO_EXPERT, decide, fused_answers
from askexpert.commands.route import COLUMNS as ROUTE_COLUMNS
from askexpert.commands.route import find_images, read_images
from askexpert.deploy.bundle import load_bundle
from askexpert.deploy.client import ExpertClient, OffloadFailed
from askexpert.modules.loading import load_classifier
from askexpert.pipeline.finished_run import open_finished_run

MARGIN = 0.5
IMAGES = 120  # of the run's 300 test images: enough for pairs, partial answers and fallbacks, in seconds


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def paired_run(tiny_pipeline_run, tmp_path_factory):
    """A copy of the session's run whose report has a two-expert point (the session's run stays as it is)."""
    _, run = tiny_pipeline_run
    copy = tmp_path_factory.mktemp("paired") / "run"
    shutil.copytree(run, copy, symlinks=True)
    point = ["--routing.threshold", "1.0", "--routing.second_expert.margin", str(MARGIN)]
    cli_main(["evaluate", "--run", str(copy), "--routing.second_expert.enabled", "true", *point])
    report = json.loads((copy / "report.json").read_text())
    assert report["second_expert"]["margin"] == MARGIN and report["second_expert"]["second_ratio"] > 0.1
    return copy


@pytest.fixture(scope="module")
def images(paired_run, tmp_path_factory):
    """IMAGES test images as PNG files in folders named after their classes."""
    from PIL import Image

    from datamodules.datamodule import ImageDataModule

    datamodule = ImageDataModule(**open_finished_run(str(paired_run)).settings.data.as_dict())
    pixels, labels = datamodule.tensors("test")[:2]
    folder = tmp_path_factory.mktemp("paired_images")
    for i in range(IMAGES):
        target = folder / datamodule.class_names[int(labels[i])]
        target.mkdir(exist_ok=True)
        Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).save(target / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def paired_export(paired_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("paired_export") / "system"
    manifest = cli_main(["export", "--run", str(paired_run), "--out", str(out), "--int8", "true"])
    return out, manifest


@pytest.fixture(scope="module")
def server(paired_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired_serve")
    served = Server(paired_export[0], folder).wait_ready()
    yield served
    served.kill()


def expected_answers(run, images, second: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answers, routes, second routes) of the run's PyTorch models on `images` at the report's point, computed
    here with the routing functions themselves."""
    finished = open_finished_run(str(run))
    routing, threshold = finished.operating_point(second_expert=second)
    partition, layout = finished.partition(), finished.layout
    generalist = load_classifier(layout.best(layout.stage_dir("generalist")))
    logits = batched_logits(generalist, in_batches(images, 64))
    decision = decide(logits, partition.coverage(), routing["temperature_value"], routing["gate"], routing["top_k"])
    routes = decision.routes(threshold)
    pair = routing.get("second_expert")
    second_routes = decision.second_routes(threshold, pair["margin"] if pair else None)
    family = finished.settings.specialization
    experts = [load_classifier(layout.best(layout.expert_dir(family, e))) for e in range(partition.num_experts)]
    expert_logits = {e: batched_logits(model, in_batches(images, 64)) for e, model in enumerate(experts)}
    answer = fused_answers(
        decision.probs,
        routes,
        lambda e, rows: expert_logits[e][rows],
        routing["fusion"],
        second=(second_routes, decision.mass, pair["fusion"]) if pair else None,
    )
    return answer, routes, second_routes


def test_route_asks_the_second_expert_of_the_report_point_and_off_is_the_old_csv(paired_run, images, tmp_path, capsys):
    paths = find_images(str(images))
    pixels = read_images(paths, 32)[0]
    args = ["route", "--run", str(paired_run), "--images", str(images)]

    code, out, err = run_main([*args, "--out", str(tmp_path / "on.csv")], capsys)
    assert code == 0, err
    rows = read_rows(tmp_path / "on.csv")
    assert list(rows[0]) == [*ROUTE_COLUMNS[:6], "second_expert", *ROUTE_COLUMNS[6:]]
    answer, routes, second = expected_answers(paired_run, pixels, second=True)
    assert [int(r["prediction_id"]) for r in rows] == answer.tolist()
    assert [r["second_expert"] for r in rows] == [str(e) if e != NO_EXPERT else "" for e in second.tolist()]
    both = int((second != NO_EXPERT).sum())
    assert 0 < both < len(rows) and f"{both} of them to two experts" in out and "margin 0.50, `mass` fusion" in out

    code, out, err = run_main(
        [*args, "--out", str(tmp_path / "off.csv"), "--routing.second_expert.enabled", "false"], capsys
    )
    assert code == 0, err
    rows = read_rows(tmp_path / "off.csv")
    assert list(rows[0]) == list(ROUTE_COLUMNS) and "two experts" not in out  # the CSV of one expert, as before
    answer, routes, _ = expected_answers(paired_run, pixels, second=False)
    assert [int(r["prediction_id"]) for r in rows] == answer.tolist()
    assert [r["expert"] for r in rows] == [str(e) if e != NO_EXPERT else "" for e in routes.tolist()]

    # the report point's margin and fusion overridden: margin 0 never asks a second expert
    override = ["--routing.second_expert.margin", "0", "--routing.second_expert.fusion", "mean"]
    code, out, err = run_main([*args, "--out", str(tmp_path / "m0.csv"), *override], capsys)
    assert code == 0 and "0 of them to two experts" in out and "margin 0.00, `mean` fusion" in out, err
    assert all(r["second_expert"] == "" for r in read_rows(tmp_path / "m0.csv"))


def test_route_refuses_bad_second_expert_options_in_one_line(tiny_pipeline_run, paired_run, tmp_path, capsys):
    _, plain = tiny_pipeline_run
    base = ["route", "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]
    cases = {
        (str(paired_run), "--routing.second_expert.margin", "1.5"): "margin must be in [0, 1]",
        (str(paired_run), "--routing.second_expert.margin", "-0.1"): "margin must be in [0, 1]",
        (str(paired_run), "--routing.second_expert.fusion", "max"): "unknown second-expert fusion 'max'",
        (str(paired_run), "--routing.second_expert.enabled", "false", "--routing.second_expert.margin", "0.3"): (
            "turns off"
        ),
        (str(plain), "--routing.second_expert.enabled", "true"): "has no second-expert point",
    }
    for extra, message in cases.items():
        code, _, err = run_main([*base, "--run", *extra], capsys)
        one_line(code, err, message)
    assert not (tmp_path / "p.csv").exists()


def test_export_deploys_the_two_expert_point_and_verifies_second_routes(
    paired_run, paired_export, tiny_export, tmp_path, capsys
):
    out, manifest = paired_export
    report = json.loads((paired_run / "report.json").read_text())
    point = manifest["operating_point"]
    assert point["second_expert"] == {"margin": MARGIN, "fusion": report["second_expert"]["fusion"]}
    assert point["threshold"] == report["second_expert"]["threshold"]
    assert load_bundle(str(out)).operating_point["second_expert"] == point["second_expert"]
    gate = manifest["verification"]["routing"]
    assert gate["routing_flips"] == 0 and gate["second_routing_flips"] == 0
    assert gate["asked_two_onnx"] == gate["asked_two_torch"] > 0
    assert gate["asked_two_onnx"] == round(report["second_expert"]["second_ratio"] * gate["images"])
    # the int8 system is scored as deployed: with the second expert
    one_image = 1.01 / gate["images"]  # ONNX Runtime's logits may tip one near-tie
    assert manifest["verification"]["int8"]["system_accuracy_fp32"] == pytest.approx(
        report["second_expert"]["acc"], abs=one_image
    )
    # an export without a second expert has no trace of it: its manifest (and version) are as before the option
    plain = tiny_export[1]
    assert "second_expert" not in plain["operating_point"] and "asked_two_onnx" not in plain["verification"]["routing"]
    code, _, err = run_main(
        ["export", "--run", str(paired_run), "--out", str(tmp_path / "x"), "--second_expert", "on"], capsys
    )
    one_line(code, err, "--second_expert must be auto or off")
    assert not (tmp_path / "x").exists()


def test_export_second_expert_off_deploys_the_one_expert_point(paired_run, tmp_path):
    manifest = cli_main(["export", "--run", str(paired_run), "--out", str(tmp_path / "off"), "--second_expert", "off"])
    report = json.loads((paired_run / "report.json").read_text())
    assert "second_expert" not in manifest["operating_point"]
    assert manifest["operating_point"]["threshold"] == report["selected"]["threshold"]
    assert "asked_two_onnx" not in manifest["verification"]["routing"]


class Spy:
    """ExpertClient.ask counted per expert, and made to fail for the experts in `failing`."""

    def __init__(self, monkeypatch, failing: tuple[str, ...] = (), delay_s: float = 0.0, logits=None):
        self.asked, self.replies, self.failing = Counter(), {}, failing
        self.spans: dict[tuple[str, bytes], tuple[float, float]] = {}  # (expert, image) -> (start, end)
        original = ExpertClient.ask
        spy = self

        def ask(client, expert, image):
            spy.asked[expert] += 1
            start = time.monotonic()
            if delay_s:
                time.sleep(delay_s)
            spy.spans[(expert, image.tobytes())] = (start, time.monotonic())
            if expert in spy.failing:
                raise OffloadFailed("read timeout")
            reply = {"logits": logits, "model_version": client.version} if logits else original(client, expert, image)
            spy.replies[(expert, image.tobytes())] = reply["logits"]
            return reply

        monkeypatch.setattr(ExpertClient, "ask", ask)


def test_edge_asks_both_experts_fuses_as_route_and_records_what_they_taught(
    paired_run, paired_export, server, images, tmp_path, monkeypatch
):
    spy = Spy(monkeypatch)
    served_before = predict_total(_metrics(server))
    record = tmp_path / "taught.npz"
    edge = ["edge", "--export", str(paired_export[0]), "--server", server.url, "--images", str(images)]
    summary = cli_main([*edge, "--out", str(tmp_path / "edge.csv"), "--record", str(record)])
    cli_main(["route", "--run", str(paired_run), "--images", str(images), "--out", str(tmp_path / "route.csv")])
    got, expected = read_rows(tmp_path / "edge.csv"), read_rows(tmp_path / "route.csv")
    assert [r["image"] for r in got] == [r["image"] for r in expected]
    for row, want in zip(got, expected, strict=True):
        for column in ("prediction", "offloaded", "expert", "second_expert"):
            assert row[column] == want[column], (row["image"], column)
        asked = 0 if row["expert"] == "" else 1 + (row["second_expert"] != "")
        assert int(row["experts_answered"]) == asked and row["fallback"] == "False" and not row["error"]
    # each expert got exactly the requests route's decisions call for: one per image it answers
    wanted = Counter(f"expert_{r[c]}" for r in expected for c in ("expert", "second_expert") if r[c] != "")
    assert spy.asked == wanted and predict_total(_metrics(server)) - served_before == sum(wanted.values())
    both = sum(r["second_expert"] != "" for r in expected)
    assert summary["asked_two"] == both > 0 and summary["partial_answers"] == 0
    assert summary["requests_sent"] == sum(wanted.values()) and summary["second_expert"]["margin"] == MARGIN

    # the record: every answered image as sent, and soft labels whose argmax is the answer (mass fusion for
    # two experts, the expert's own answer for one: both are the argmax of what is recorded)
    from askexpert.adapt.record import read_record

    bundle = load_bundle(str(paired_export[0]))
    kept = read_record(str(record), bundle.class_names, bundle.stored_size)
    answered = [i for i, r in enumerate(got) if int(r["experts_answered"]) > 0]
    assert summary["recorded"] == len(kept.images) == len(answered)
    sent = read_images([str(images / r["image"]) for r in got], bundle.stored_size)[0].numpy()
    assert np.array_equal(kept.images, sent[answered]) and kept.model_version == bundle.version
    assert kept.soft_labels.argmax(1).tolist() == [int(got[i]["prediction_id"]) for i in answered]
    np.testing.assert_allclose(kept.soft_labels.sum(1), 1.0, atol=1e-5)


def test_edge_falls_back_to_the_expert_that_answered_then_to_the_generalist(
    paired_export, server, images, tmp_path, monkeypatch
):
    spy = Spy(monkeypatch, failing=("expert_1",))
    record = tmp_path / "taught.npz"
    edge = ["edge", "--export", str(paired_export[0]), "--server", server.url, "--images", str(images)]
    summary = cli_main([*edge, "--out", str(tmp_path / "edge.csv"), "--record", str(record)])
    rows = read_rows(tmp_path / "edge.csv")
    pairs = [r for r in rows if r["second_expert"] != ""]
    alone_1 = [r for r in rows if r["expert"] == "1" and r["second_expert"] == ""]
    assert pairs and alone_1, "the tiny run should route images both ways"
    for row in pairs:  # one of two answered: fused with that one, not a fallback, the other named in `error`
        assert row["experts_answered"] == "1" and row["fallback"] == "False"
        assert row["error"] == "expert_1: read timeout" and row["model_version"]
    for row in alone_1:  # its only expert failed: the generalist answers
        assert row["experts_answered"] == "0" and row["fallback"] == "True" and row["error"] == "read timeout"
        assert row["prediction"] == row["generalist_prediction"]
    assert summary["partial_answers"] == len(pairs) and summary["fallbacks"] == len(alone_1)

    # what expert_0 answered alone is what the edge used and recorded: its class probabilities, exactly
    from askexpert.adapt.record import read_record

    bundle = load_bundle(str(paired_export[0]))
    kept = read_record(str(record), bundle.class_names, bundle.stored_size)
    assert len(kept.images) == sum(r["experts_answered"] != "0" for r in rows)
    for image, soft in zip(kept.images, kept.soft_labels, strict=True):
        logits = np.asarray(spy.replies[("expert_0", image.tobytes())], dtype=np.float64)
        probs = np.exp(logits - logits.max())
        np.testing.assert_allclose(soft, probs / probs.sum(), rtol=1e-5, atol=1e-7)
    # with the expert `expert` fusion, the answer is expert_0's own
    assert bundle.operating_point["fusion"] == "expert"
    answered = [r for r in rows if r["experts_answered"] == "1"]
    assert [int(r["prediction_id"]) for r in answered] == kept.soft_labels.argmax(1).tolist()


def test_edge_asks_the_two_experts_at_once(paired_export, images, tmp_path, monkeypatch):
    # no server: every request takes 0.25 s; the two requests of an image asked of two must overlap in time
    # (asked one after the other, the second would start only when the first had ended)
    width = int(paired_export[1]["models"]["expert_0"]["output"]["shape"][-1])
    spy = Spy(monkeypatch, delay_s=0.25, logits=[0.0] * width)
    monkeypatch.setattr(ExpertClient, "check_server", lambda client: None)
    argv = ["edge", "--export", str(paired_export[0]), "--server", "http://127.0.0.1:9", "--images", str(images)]
    cli_main([*argv, "--out", str(tmp_path / "edge.csv"), "--concurrency", "16"])
    pairs = [r for r in read_rows(tmp_path / "edge.csv") if r["second_expert"] != ""]
    assert pairs and all(r["experts_answered"] == "2" for r in pairs)
    by_image: dict[bytes, list[tuple[float, float]]] = {}
    for (_, image), span in spy.spans.items():
        by_image.setdefault(image, []).append(span)
    both = [sorted(spans) for spans in by_image.values() if len(spans) == 2]
    assert len(both) == len(pairs)
    assert all(second[0] < first[1] for first, second in both)  # the second started before the first ended


def test_edge_refuses_a_record_it_could_not_write_and_a_bad_manifest_point(
    paired_export, images, tmp_path, capsys, monkeypatch
):
    classified = []
    monkeypatch.setattr(
        "askexpert.commands.edge.EdgeRouter.classify", lambda self, image: classified.append(1)
    )  # nothing may be classified
    base = ["edge", "--export", str(paired_export[0]), "--server", "http://127.0.0.1:9", "--images", str(images)]
    base += ["--out", str(tmp_path / "e.csv")]
    (tmp_path / "a_file").write_text("")
    for record, message in (
        (tmp_path / "missing" / "r.npz", "does not exist"),
        (tmp_path, "is a folder"),
        (tmp_path / "a_file" / "r.npz", "does not exist"),
    ):
        code, _, err = run_main([*base, "--record", str(record)], capsys)
        one_line(code, err, "--record", message)
    bad = tmp_path / "bad"
    shutil.copytree(paired_export[0], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["operating_point"]["second_expert"]["fusion"] = "max"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_main(["edge", "--export", str(bad), *base[3:]], capsys)
    one_line(code, err, "operating_point.second_expert.fusion must be one of mass, expert, product, mean, got 'max'")
    assert not classified and not (tmp_path / "e.csv").exists()


def _metrics(server) -> str:
    import httpx

    return httpx.get(f"{server.url}/metrics", timeout=5).text

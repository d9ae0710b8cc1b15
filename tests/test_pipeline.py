"""`pipeline`, `evaluate`, `route` and `profile` end to end, on a tiny stand-in run (micro ViTs, one epoch)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from helpers.cli import assert_clean_failure, run_main
from helpers.pipelines import make_four_class_folder, write_configs

from askexpert.collab.logits import read_cache_file


@pytest.fixture
def finished(tiny_pipeline_run):
    """The session's finished tiny pipeline run (conftest.py), read-only; copy it before changing it."""
    return tiny_pipeline_run


def copy_run(finished, tmp_path) -> tuple[Path, Path]:
    config, out = finished
    target = tmp_path / "run"
    shutil.copytree(out, target)
    return config, target


def test_report_has_every_field_the_issue_asks_for(finished):
    _, out = finished
    report = json.loads((out / "report.json").read_text())
    data = report["data"]
    assert data["source"] == "synthetic" and data["stand_in"] is True and data["num_classes"] == 100
    assert data["train_size"] == 800 and data["test_size"] == 300  # 10 per class minus the 20 % holdout
    assert report["generalist"]["params"] > 0 and 0 <= report["generalist"]["test_acc"] <= 1
    assert len(report["experts"]) == 2
    for i, expert in enumerate(report["experts"]):
        assert expert["name"] == f"progressive_{i}" and expert["strategy"] == "progressive" and expert["init"] == "base"
        assert len(expert["classes"]) == 50 and len(expert["class_names"]) == 50
        assert 0 <= expert["subset_test_acc"] <= 1 and expert["params"] > 0
    assert set(report["baselines"]) == {
        "edge_only",
        "edge_medium",
        "full_offload",
        "random_expert",
        "oracle_expert",
        "static_experts",
    }
    point_keys = {"acc", "latency_ms", "energy_mj", "system_energy_mj"}
    for entry in report["baselines"].values():
        assert point_keys <= set(entry) and 0 <= entry["acc"] <= 1
    assert len(report["sweep"]) == 101
    assert {"threshold", "offload_ratio", "acc", "latency_ms", "energy_mj"} <= set(report["sweep"][0])
    selected = report["selected"]
    assert selected["chosen_on"] == "val" and 0 <= selected["threshold"] <= 1 and 0 <= selected["offload_ratio"] <= 1
    assert point_keys <= set(selected)
    provenance = report["provenance"]
    assert {"packages", "git_revision", "seed", "profile"} <= set(provenance)
    assert provenance["profile"]["name"] == "pi4_wifi_orin"
    # the accuracy in the report is the accuracy of the cached logits, recomputed here
    cached = read_cache_file(str(out / "logits" / "generalist_test.safetensors"))
    recomputed = float((cached["logits"].argmax(-1) == cached["labels"]).double().mean())
    assert report["generalist"]["test_acc"] == pytest.approx(recomputed)
    assert report["baselines"]["edge_only"]["acc"] == pytest.approx(recomputed)


def test_report_files_and_artefacts(finished):
    _, out = finished
    text = (out / "report.md").read_text()
    assert "STAND-IN" in text and "| **askexpert**" in text and "edge only" in text
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("generalist", "base", "experts/progressive/0", "experts/progressive/1", "experts/static/1"):
        assert (out / stage / "checkpoints" / "best.ckpt").is_file()
        assert (out / stage / "config.yaml").is_file()
    assert json.loads((out / "partition.json").read_text())["method"] == "superclass"
    assert sorted(p.name for p in (out / "logits").iterdir())[:2] == ["base_test.safetensors", "base_val.safetensors"]


def test_sanity_findings_come_before_any_number(finished, tmp_path, capsys):
    """The tiny run's micro ViTs (one epoch, 3 test images per class) are near chance: the findings open
    report.json and report.md, and `evaluate` (the same printing as `pipeline`) warns before the table."""
    _, out = finished
    report = json.loads((out / "report.json").read_text())
    assert next(iter(report)) == "findings"
    assert any(f["check"] == "near_chance" for f in report["findings"]), report["findings"]
    for entry in [*report["experts"], *report["static_experts"]]:
        assert entry["subset_test_images"] == 150  # 50 classes x 3 test images
    markdown = (out / "report.md").read_text().splitlines()
    assert markdown[0].startswith("# askexpert report") and markdown[2] == "## Sanity findings"
    header = "| system | accuracy | offload | latency (ms) | edge energy (mJ) | system energy (mJ) |"
    table = markdown.index(header)
    warnings_md = [i for i, line in enumerate(markdown) if line.startswith("- WARNING: ")]
    assert len(warnings_md) == len(report["findings"]) and max(warnings_md) < table
    code, stdout, err = run_main(["evaluate", "--run", str(out), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    warnings_out = [i for i, line in enumerate(lines) if line.startswith("WARNING: ")]
    assert [lines[i] for i in warnings_out] == [f"WARNING: {f['message']}" for f in report["findings"]]
    assert max(warnings_out) < lines.index(header)


def test_rerun_skips_every_finished_stage(finished, tmp_path, capsys):
    config, out = copy_run(finished, tmp_path)
    before = (out / "generalist" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout.count("config unchanged, skipped") == 7  # 2 models + partition + 2 x 2 experts
    assert (out / "generalist" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == before


# slow (~18 s): retrains a pipeline; stage identities and refusals stay in the default run (test_pipeline_stages.py)
@pytest.mark.slow
def test_a_changed_config_is_refused_then_overwritten(finished, tmp_path, capsys):
    config, out = copy_run(finished, tmp_path)
    record = (out / "stages.json").read_text()
    args = ["pipeline", "--config", str(config), "--out", str(out), "--base.overrides", '{"model.init_args.lr": 0.01}']
    code, _, err = run_main(args, capsys)
    assert code == 2 and "holds a run with a different config (stages: base" in err and "--overwrite" in err
    assert (out / "stages.json").read_text() == record  # nothing touched
    code, stdout, err = run_main([*args, "--overwrite", "true"], capsys)
    assert code == 0, err
    # the base model and the experts started from it are retrained; generalist and partition are kept
    assert "[1/7] generalist: done, config unchanged, skipped" in stdout
    assert "[2/7] base: running" in stdout and "[3/7] partition: done" in stdout
    assert "[4/7] experts/progressive/0: running" in stdout and "[7/7] experts/static/1: running" in stdout


@pytest.mark.slow  # tests/test_run_safety.py covers resuming (bit-identical) in the default run
def test_a_killed_stage_resumes_from_its_last_checkpoint(tmp_path, cli_env):
    config = write_configs(tmp_path)
    killer = tmp_path / "killer.yaml"  # the generalist dies when its second epoch starts
    killer.write_text("trainer:\n  callbacks:\n    - class_path: killer.KillOnce\n      init_args:\n        epoch: 1\n")
    raw = yaml.safe_load(config.read_text())
    raw["generalist"] = {
        "config": [raw["generalist"]["config"][0], str(killer)],
        "overrides": {"trainer.max_epochs": 2},
    }
    raw["static_baseline"] = False
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "askexpert", "pipeline", "--config", str(config), "--out", str(out)]
    cli_env = {**cli_env, "KILL_ONCE_MARKER": str(tmp_path / "killed")}
    first = subprocess.run(command, env=cli_env, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == -9, first.stderr[-2000:]
    assert (out / "generalist" / "checkpoints" / "last.ckpt").is_file() and not (out / "report.json").exists()
    second = subprocess.run(command, env=cli_env, capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[1/5] generalist: resuming from its last checkpoint" in second.stdout
    epochs = {row["epoch"] for row in csv.DictReader(open(out / "generalist" / "metrics.csv")) if row["epoch"]}
    assert epochs == {"0", "1"}
    assert (out / "report.json").is_file()


def test_evaluate_with_another_gate_and_profile(finished, tmp_path, capsys):
    _, out = finished
    target = tmp_path / "eval"
    lte = REPO / "configs" / "profiles" / "pi4_lte_orin.yaml"
    args = ["evaluate", "--run", str(out), "--out", str(target), "--routing.gate", "entropy", "--profile", str(lte)]
    args += ["--routing.budget.offload_ratio", "0.3"]
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    report = json.loads((target / "report.json").read_text())
    original = json.loads((out / "report.json").read_text())
    assert report["routing"]["gate"] == "entropy" and report["routing"]["top_k"] == original["routing"]["top_k"]
    assert report["routing"]["budget"] == {"offload_ratio": 0.3}
    assert report["provenance"]["profile"]["name"] == "pi4_lte_orin"
    # LTE has a longer round trip: full offload is slower than over WiFi
    assert report["baselines"]["full_offload"]["latency_ms"] > original["baselines"]["full_offload"]["latency_ms"] + 10
    assert report["baselines"]["edge_only"] == original["baselines"]["edge_only"]  # same logits, same edge
    assert "evaluation:" in stdout and "| **askexpert**" in stdout


def test_route_a_folder_of_images(finished, tmp_path, capsys):
    from PIL import Image

    from datamodules.synthetic import make_synthetic

    _, out = finished
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    splits = make_synthetic(train_per_class=1, test_per_class=1)
    for i in range(6):
        pixels = splits.test_images[i].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).resize((48, 48)).save(images / ("sub" if i % 2 else "") / f"img{i}.png")
    (images / "notes.jpg").write_text("not an image")
    preds = tmp_path / "preds.csv"
    args = ["route", "--run", str(out), "--images", str(images), "--out", str(preds), "--threshold", "1.0"]
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == 6 and "skipped 1 unreadable" in stdout
    assert list(rows[0]) == [
        "image",
        "prediction",
        "prediction_id",
        "confidence",
        "offloaded",
        "expert",
        "generalist_prediction",
        "generalist_probability",
    ]
    class_names = json.loads((out / "partition.json").read_text())["class_names"]
    for row in rows:
        assert row["prediction"] == class_names[int(row["prediction_id"])]
        assert row["offloaded"] == "True" and row["expert"] in ("0", "1")  # threshold 1: every unsure image goes
    assert {r["image"] for r in rows} >= {"img0.png", "sub/img1.png"}
    # threshold 0: nothing is offloaded and the answer is the generalist's
    run_main([*args[:-2], "--threshold", "0"], capsys)
    for row in csv.DictReader(open(preds)):
        assert row["offloaded"] == "False" and row["expert"] == "" and row["prediction"] == row["generalist_prediction"]


def test_profile_measures_models_and_evaluate_uses_the_times(finished, tmp_path, capsys):
    _, out = finished
    profile = tmp_path / "measured.yaml"
    args = ["profile", "--run", str(out), "--out", str(profile), "--min_run_time", "0.05", "--role", "edge"]
    code, _, err = run_main(
        [
            "profile",
            "--models",
            "vit_micro_patch8_32",
            "vit_edge_patch8_32",
            "--out",
            str(tmp_path / "m.yaml"),
            "--min_run_time",
            "0.02",
        ],
        capsys,
    )
    assert code == 0, err
    assert set(yaml.safe_load((tmp_path / "m.yaml").read_text())["near_edge"]["measured_ms"]) == {
        "vit_micro_patch8_32/100/32",
        "vit_edge_patch8_32/100/32",
    }
    for bad, message in (
        (["--models", "nope"], "unknown model 'nope'"),
        (["--models", "vit_micro_patch8_32", "--device", "foo"], "unknown --device"),
        (["--models", "vit_micro_patch8_32", "--image_size", "4"], "4x4 images"),
    ):
        code, _, err = run_main(["profile", *bad, "--out", str(tmp_path / "bad.yaml")], capsys)
        assert code == 2 and message in err and not (tmp_path / "bad.yaml").exists()
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    raw = yaml.safe_load(profile.read_text())
    assert (
        set(raw["edge"]["measured_ms"]) == {"vit_micro_patch8_32/100/32"}
        and raw["edge"]["measured_ms"]["vit_micro_patch8_32/100/32"] > 0
    )
    assert "measured_ms" not in raw["near_edge"]
    code, _, err = run_main(
        ["evaluate", "--run", str(out), "--out", str(tmp_path / "e"), "--profile", str(profile)], capsys
    )
    assert code == 0, err
    costs = json.loads((tmp_path / "e" / "report.json").read_text())["costs"]["models"]["generalist"]
    assert costs["edge_source"] == "measured" and costs["near_edge_source"] == "flops"
    assert costs["edge_ms"] == pytest.approx(raw["edge"]["measured_ms"]["vit_micro_patch8_32/100/32"])


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--routing.threshold", "1.5"], ["threshold must be in [0, 1], got 1.5"]),
        (["--routing.top_k", "0"], ["top_k must be between 1 and the number of classes (100), got 0"]),
        (["--routing.top_k", "101"], ["top_k must be between 1"]),
        (["--routing.gate", "vibes"], ["unknown gate 'vibes'", "max_prob, margin, entropy"]),
        (["--routing.fusion", "vote"], ["unknown fusion 'vote'"]),
        (["--routing.budget.offload_ratio", "2"], ["budget offload_ratio must be in [0, 1]"]),
        (["--routing.constrained.offload_ratio", "2"], ["constrained budget offload_ratio must be in [0, 1]"]),
        (["--routing.constrained.latency_ms", "0.1"], ["--routing.constrained.latency_ms 0.1 cannot be met"]),
        (["--specialization_args", '{"flor": 0.1}'], ["stage experts/progressive/0:", "'flor' is not accepted"]),
        (["--specialization", "magic"], ["magic", "progressive"]),
        (["--partition.method", "astrology"], ["unknown partition method 'astrology'"]),
        (["--partition.num_experts", "0"], ["num_experts must be at least 1"]),
        (["--profile", "nowhere.yaml"], ["device profile not found: nowhere.yaml"]),
        (["--base.overrides", '{"data.source": "cifar100"}'], ["base.overrides sets data.source"]),
        (["--base.config", '["missing.yaml"]'], ["base.config: file not found: missing.yaml"]),
        (["--base.overrides", '{"model.init_args.lr": -1}'], ["stage base:", "lr must be positive"]),
        (["--experts.overrides", '{"trainer.max_epochs": "abc"}'], ["stage experts/progressive/0:"]),
        (["--partition.method", "explicit"], ["--partition.method explicit needs the class lists"]),
        (
            ["--partition.method", "explicit", "--partition.experts", "[[0, 1], [500]]"],
            ["class id 500 is out of range"],
        ),
        (["--partition.num_experts", "200"], ["20 superclasses"]),
        (["--partition.overlap", "-1"], ["--partition.overlap must be between 0 and", "got -1"]),
        (
            ["--partition.overlap", "2", "--data.val_fraction", "0", "--routing.threshold", "0.5"]
            + ["--routing.temperature", "false"],
            ["overlap read validation data"],
        ),
        (["--data.val_fraction", "0"], ["need a validation split"]),
        (  # a given threshold and no temperature, but a constrained point to choose: it needs the split too
            ["--data.val_fraction", "0", "--routing.threshold", "0.5", "--routing.temperature", "false"]
            + ["--routing.constrained.offload_ratio", "0.25"],
            ["need a validation split", "no --routing.constrained"],
        ),
        (["--routing.budget.latency_ms", "0.001"], ["budget.latency_ms 0.001 cannot be met"]),
        (["--data.image_size", "4"], ["stage generalist:", "vit_micro_patch8_32", "4x4 images"]),
        (["--routing", "3"], ["routing"]),
    ],
)
def test_bad_pipeline_input_fails_before_anything_is_written(extra, fragments, tmp_path, capsys):
    config = write_configs(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(out), *extra], capsys)
    assert_clean_failure(code, err, out, *fragments)


def test_profiles_with_missing_or_negative_fields_are_refused(tmp_path, capsys):
    config = write_configs(tmp_path)
    raw = yaml.safe_load((REPO / "configs" / "profiles" / "pi4_wifi_orin.yaml").read_text())
    del raw["link"]["rtt_ms"]
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(raw))
    raw["link"]["rtt_ms"] = -3
    (tmp_path / "negative.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    for name, fragment in (
        ("missing", "profile section 'link' misses rtt_ms"),
        ("negative", "link.rtt_ms must be non-negative"),
    ):
        args = ["pipeline", "--config", str(config), "--out", str(out), "--profile", str(tmp_path / f"{name}.yaml")]
        code, _, err = run_main(args, capsys)
        assert_clean_failure(code, err, out, fragment)


def test_an_out_folder_with_other_files_is_refused_even_with_overwrite(tmp_path, capsys):
    config = write_configs(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite", "true"]):
        code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(out), *extra], capsys)
        assert code == 2 and "already holds files that are not a pipeline run" in err
        assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_section_given_as_a_plain_value_is_one_line(tmp_path, capsys):
    config = write_configs(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["routing"] = {"budget": 5}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(out)], capsys)
    assert_clean_failure(code, err, out, "budget")


def test_evaluate_reads_the_run_from_a_config_file_and_keeps_its_settings(finished, tmp_path, capsys):
    _, out = finished
    settings = tmp_path / "ev.yaml"
    settings.write_text(yaml.safe_dump({"run": str(out), "out": str(tmp_path / "e"), "routing": {"fusion": "mean"}}))
    code, _, err = run_main(["evaluate", "--config", str(settings)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    original = json.loads((out / "report.json").read_text())
    assert report["routing"]["fusion"] == "mean"
    assert (
        report["routing"]["top_k"] == original["routing"]["top_k"]
        and report["routing"]["gate"] == original["routing"]["gate"]
    )


def test_evaluate_refuses_broken_runs(finished, tmp_path, capsys):
    code, _, err = run_main(["evaluate", "--run", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "run folder not found" in err
    _, out = copy_run(finished, tmp_path)
    (out / "partition.json").unlink()
    code, _, err = run_main(["evaluate", "--run", str(out)], capsys)
    assert code == 2 and "partition artefact not found" in err
    # a partition of another class set
    _, out = finished
    other = copy_run(finished, tmp_path / "other")[1]
    partition = json.loads((out / "partition.json").read_text())
    renamed = json.dumps(partition).replace(f'"{partition["class_names"][0]}"', '"not_a_class"')  # consistently
    (other / "partition.json").write_text(renamed)
    code, _, err = run_main(["evaluate", "--run", str(other)], capsys)
    assert code == 2 and "the partition was built for 100 classes" in err
    # a partition whose experts are not the trained ones, or fewer of them
    partition = json.loads((out / "partition.json").read_text())
    first, second = partition["experts"][0], partition["experts"][1]
    for key in ("classes", "names"):  # swapped consistently: a valid partition, just not the trained one
        first[key][0], second[key][0] = second[key][0], first[key][0]
    (other / "partition.json").write_text(json.dumps(partition))
    code, _, err = run_main(["evaluate", "--run", str(other)], capsys)
    assert code == 2 and "was trained on other classes than" in err
    code, _, err = run_main(
        ["route", "--run", str(other), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv"), "--threshold", "1"],
        capsys,
    )
    assert code == 2 and "was trained on other classes than" in err and not (tmp_path / "p.csv").exists()
    partition = json.loads((out / "partition.json").read_text())
    partition["experts"] = partition["experts"][:1]
    partition["details"]["allow_uncovered"] = True
    (other / "partition.json").write_text(json.dumps(partition))
    code, _, err = run_main(["evaluate", "--run", str(other)], capsys)
    assert code == 2 and "has 1 experts but the run was made with 2" in err


def test_evaluate_refuses_a_checkpoint_of_another_class_set(finished, tmp_path, capsys):
    _, out = copy_run(finished, tmp_path)
    ckpt_path = out / "base" / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(ckpt_path, weights_only=True)
    names = list(checkpoint["hyper_parameters"]["class_names"])
    checkpoint["hyper_parameters"]["class_names"] = [*names[1:], names[0]]
    torch.save(checkpoint, ckpt_path)
    code, _, err = run_main(["evaluate", "--run", str(out)], capsys)
    assert code == 2 and "base" in err and "different class set than the data" in err


def test_route_refuses_a_folder_without_images(finished, tmp_path, capsys):
    _, out = finished
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"\x89PNG broken")
    preds = tmp_path / "preds.csv"
    code, _, err = run_main(["route", "--run", str(out), "--images", str(empty), "--out", str(preds)], capsys)
    assert code == 2 and "no readable image in" in err and not preds.exists()
    code, _, err = run_main(
        ["route", "--run", str(out), "--images", str(tmp_path / "nope"), "--out", str(preds)], capsys
    )
    assert code == 2 and "image folder not found" in err
    _, copied = copy_run(finished, tmp_path / "copy")
    (copied / "report.json").write_text("{")
    code, _, err = run_main(["route", "--run", str(copied), "--images", str(empty), "--out", str(preds)], capsys)
    assert code == 2 and "report.json is damaged" in err


def test_evaluate_logs_tables_and_plot_to_wandb_offline(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must follow from the policy, not the test env
    _, out = finished
    target = tmp_path / "eval"
    args = ["evaluate", "--run", str(out), "--out", str(target), "--wandb_project", "askexpert-test"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    runs = list((target / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (target / "wandb").iterdir())
    media = [p.name for p in runs[0].rglob("*") if p.is_file()]
    assert any(name.startswith("sweep") and name.endswith(".table.json") for name in media), media
    assert any(name.startswith("pareto") and name.endswith(".png") for name in media), media


def test_the_same_pipeline_runs_on_an_image_folder(tmp_path, capsys):
    """`--data.source imagefolder --data.root PATH`: 4 classes without superclasses, a random partition."""
    root = make_four_class_folder(tmp_path / "images", side=20)
    config = write_configs(tmp_path)
    out = tmp_path / "run"
    args = ["pipeline", "--config", str(config), "--out", str(out), "--data.source", "imagefolder"]
    args += ["--data.root", str(root), "--partition.method", "random", "--routing.top_k", "2"]
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "imagefolder" and report["data"]["stand_in"] is False
    assert report["data"]["num_classes"] == 4 and report["data"]["test_size"] == 8
    assert sorted(c for e in report["experts"] for c in e["classes"]) == [0, 1, 2, 3]
    assert "imagefolder data" in stdout and "STAND-IN" not in stdout
    # superclass partitions need superclasses: refused before training
    code, _, err = run_main([*args[:-4], "--out", str(tmp_path / "other")], capsys)
    assert code == 2 and "no superclasses" in err and not (tmp_path / "other").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"generalist": "done"}'])
def test_a_damaged_stage_record_is_one_line(finished, tmp_path, capsys, text):
    _, out = copy_run(finished, tmp_path)
    (out / "stages.json").write_text(text)
    for command in (["evaluate", "--run", str(out)], ["pipeline", "--config", str(finished[0]), "--out", str(out)]):
        code, _, err = run_main(command, capsys)
        assert code == 2 and f"{out / 'stages.json'} is damaged; use --overwrite" in err and "Traceback" not in err

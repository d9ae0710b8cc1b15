"""A finished run stays as it was, and a copied run still evaluates (issue 13, items 2 and 7).

One tiny pipeline run is built once for the module (its stages are ordinary `fit` run folders, so
`RUN/generalist/config.yaml` is the README's `--config RUN/config.yaml` pattern). Each test records every file of
the run (path and bytes), runs commands, and checks that no file that was there changed or disappeared, and
that the outputs appeared where the docs say. The run is also made with a calibration split
(`--data.calib_fraction`), so its report checks item 8 end to end; tests/test_calibration.py has the rest.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers.cli import run_main
from helpers.pipelines import write_configs
from lightning.pytorch.callbacks import Callback

from askexpert.cli import cli_main
from askexpert.collab.plots import PLOT_FILES
from askexpert.collab.report import diagnostic_plots_wanted


class FailOnStart(Callback):
    """Makes validate / test / predict fail after the Trainer is set up: where the old code had already rewritten
    the run's config.yaml and hparams.yaml."""

    def _fail(self, *args) -> None:
        raise RuntimeError("failing on purpose after the trainer was set up")

    on_validation_start = on_test_start = on_predict_start = _fail


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny pipeline run (2 experts, no static baseline, a calibration split) whose device profile file
    is deleted afterwards: the run must not need it any more."""
    folder = tmp_path_factory.mktemp("readonly")
    config = write_configs(folder)
    profile = folder / "my_device.yaml"
    shutil.copy(REPO / "configs" / "profiles" / "pi4_wifi_orin.yaml", profile)
    out = folder / "run"
    args = ["pipeline", "--config", str(config), "--out", str(out), "--static_baseline", "false"]
    short = json.dumps({"trainer.limit_train_batches": 2})
    args += ["--generalist.overrides", short, "--base.overrides", short]
    cli_main([*args, "--profile", str(profile), "--data.calib_fraction", "0.1"])
    profile.unlink()
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`: relative path -> content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def changes(before: dict[str, bytes], folder: Path) -> tuple[list[str], list[str]]:
    """(files that were there and changed or went, files that are new) since `before`."""
    after = snapshot(folder)
    changed = [path for path, content in before.items() if after.get(path) != content]
    return changed, sorted(set(after) - set(before))


def readme_predict_command(run: Path) -> list[str]:
    """The README's `predict` example ("Load a checkpoint and predict"), word for word, on this run."""
    text = (REPO / "README.md").read_text()
    block = text.split("From the command line, `predict`", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "askexpert"] and words[3] == "predict", words
    return [word.replace("runs/demo", str(run)) for word in words[3:]]


def test_validate_test_and_predict_leave_the_run_as_it_was(run, capsys):
    stage = run / "generalist"
    before = snapshot(run)
    config, best = str(stage / "config.yaml"), str(stage / "checkpoints" / "best.ckpt")
    for command in ("validate", "test"):
        code, out, err = run_main([command, "--config", config, "--ckpt_path", best], capsys)
        assert code == 0, err
        assert f"GeneralistModule {'val' if command == 'validate' else command} accuracy" in out
    # the README's predict example, after `test` used the same config.yaml (that used to break it)
    code, _, err = run_main(readme_predict_command(run), capsys)
    assert code == 0, err
    changed, new = changes(before, run)
    assert changed == []
    assert new == [f"generalist/eval/{name}" for name in ("predictions.csv", "test_results.json", "val_results.json")]
    result = json.loads((stage / "eval" / "test_results.json").read_text())
    assert 0 <= result["metrics"]["test/acc"] <= 1 and result["data"]["calib_size"] == 100
    assert len((stage / "eval" / "predictions.csv").read_text().splitlines()) == 1 + 300


def test_another_root_dir_gets_the_outputs_and_the_run_stays(run, tmp_path, capsys):
    stage = run / "experts" / "progressive" / "0"  # an expert too: its config names the partition
    before = snapshot(run)
    other = tmp_path / "elsewhere"
    common = ["--config", str(stage / "config.yaml"), "--trainer.default_root_dir", str(other)]
    for command in ("test", "predict"):
        code, _, err = run_main([command, *common, "--ckpt_path", str(stage / "checkpoints" / "best.ckpt")], capsys)
        assert code == 0, err
    assert changes(before, run) == ([], [])
    assert sorted(p.name for p in (other / "eval").iterdir()) == ["predictions.csv", "test_results.json"]
    assert sorted(p.name for p in other.iterdir()) == ["eval"]


def test_failed_commands_leave_the_run_as_it_was(run, capsys):
    stage = run / "base"
    before = snapshot(run)
    config, best = str(stage / "config.yaml"), str(stage / "checkpoints" / "best.ckpt")
    # a bad option after the run's config: refused in one line
    code, _, err = run_main(["test", "--config", config, "--ckpt_path", best, "--trainer.max_epochs", "abc"], capsys)
    assert code == 2 and err.startswith("askexpert: error:")
    # a failure after the Trainer was set up (config saving and loggers had run by then)
    failing = json.dumps([{"class_path": f"{__name__}.FailOnStart"}])
    with pytest.raises(RuntimeError, match="failing on purpose"):
        cli_main(["predict", "--config", config, "--ckpt_path", best, "--trainer.callbacks", failing])
    assert changes(before, run) == ([], [])


def test_the_calibration_split_sets_the_operating_point(run):
    report = json.loads((run / "report.json").read_text())
    assert report["selected"]["chosen_on"] == "calib" and report["data"]["calib_size"] == 100
    assert report["data"]["train_size"] == 700 and report["data"]["val_size"] == 200  # val: as without calib
    cached = {p.name.split(".")[0] for p in (run / "logits").iterdir()}  # whatever the cache's file format
    assert {"generalist_calib", "base_calib", "progressive_0_calib", "progressive_1_calib"} <= cached
    assert "100 held out for calibration" in (run / "report.md").read_text()


def test_the_run_reader_opens_a_run_as_every_command_that_reads_one_does(run, tmp_path):
    from askexpert.errors import UserError
    from askexpert.pipeline.finished_run import open_finished_run, open_run

    before = snapshot(run)
    finished = open_finished_run(str(run))
    assert finished.settings.specialization == "progressive" and not finished.settings.static_baseline
    report = json.loads((run / "report.json").read_text())
    routing, threshold = finished.operating_point()
    assert threshold == report["selected"]["threshold"]
    assert routing == {key: report["routing"][key] for key in ("temperature_value", "gate", "top_k", "fusion")}
    assert finished.partition().num_experts == 2
    # every model the run trained, in path order: what `profile` found by searching the folder before
    assert finished.model_checkpoints() == sorted(str(path) for path in run.rglob("checkpoints/best.ckpt"))
    assert len(finished.model_checkpoints()) == 4  # generalist, base, 2 experts
    # a stage that did not finish: `profile` still opens the run (and times what exists), no other command does
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "pipeline.yaml", unfinished / "pipeline.yaml")
    (unfinished / "stages.json").write_text(json.dumps({"generalist": {"done": False}}))
    assert open_run(str(unfinished)).model_checkpoints() == []
    with pytest.raises(UserError, match="stage generalist of .* has not finished"):
        open_finished_run(str(unfinished))
    assert changes(before, run) == ([], [])


def _images(folder: Path) -> Path:
    from PIL import Image

    from datamodules.synthetic import make_synthetic

    folder.mkdir(parents=True, exist_ok=True)
    splits = make_synthetic(train_per_class=1, test_per_class=1)
    for i in range(12):
        Image.fromarray(splits.test_images[i * 7].permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    return folder


def test_a_copied_run_evaluates_and_routes_unchanged(run, tmp_path, capsys):
    settings = yaml.safe_load((run / "pipeline.yaml").read_text())
    assert settings["profile"] == "profile/my_device.yaml"  # the run's own copy, relative to the run
    images = _images(tmp_path / "images")
    before = snapshot(run)
    code, _, err = run_main(
        ["route", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "a.csv")], capsys
    )
    assert code == 0, err
    assert changes(before, run) == ([], [])  # route only reads the run
    original = json.loads((run / "report.json").read_text())
    copy = tmp_path / "copied" / "run"
    shutil.copytree(run, copy)
    moved = run.with_name("moved")
    run.rename(moved)  # the original path is gone while the copy is evaluated
    try:
        logits = snapshot(copy / "logits")
        code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
        assert code == 0, err
        code, _, err = run_main(
            ["route", "--run", str(copy), "--images", str(images), "--out", str(tmp_path / "b.csv")], capsys
        )
        assert code == 0, err
    finally:
        moved.rename(run)
    assert snapshot(copy / "logits") == logits  # every cached logit was reused: its keys hold after the move
    report = json.loads((copy / "report.json").read_text())
    for key in ("findings", "data", "generalist", "base", "partition", "experts", "routing", "selected", "sweep"):
        assert report[key] == original[key], key
    assert report["baselines"] == original["baselines"] and report["costs"] == original["costs"]
    assert report["partition"]["path"] == "partition.json"
    assert report["costs"]["profile"]["path"] == "profile/my_device.yaml"
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


def test_evaluate_writes_only_its_report(run, tmp_path, capsys):
    """Last in this file: it replaces the run's report."""
    before = snapshot(run)
    elsewhere = tmp_path / "lte"
    lte = str(REPO / "configs" / "profiles" / "pi4_lte_orin.yaml")
    code, _, err = run_main(["evaluate", "--run", str(run), "--out", str(elsewhere), "--profile", lte], capsys)
    assert code == 0, err
    assert changes(before, run) == ([], [])  # --out elsewhere: the run is untouched (its logits were cached)
    report_files = {"report.json", "report.md", "pareto.png"}  # (the diagnostic plots are off in the suite)
    report_files |= set(PLOT_FILES) if diagnostic_plots_wanted() else set()
    assert {p.name for p in elsewhere.iterdir()} == report_files
    code, _, err = run_main(["evaluate", "--run", str(run), "--routing.gate", "margin"], capsys)
    assert code == 0, err
    changed, new = changes(before, run)  # the default --out: the run's own report, replaced
    assert set(changed) <= report_files and "report.json" in changed and new == []
    assert (run / "logits").is_dir() and json.loads((run / "report.json").read_text())["routing"]["gate"] == "margin"


def test_evaluate_waits_for_a_writer_to_finish(run, tmp_path, capsys):
    """No lock of its own, but no report written while a pipeline still works in the run."""
    from helpers.locks import hold

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    holder = hold(copy)
    try:
        before = snapshot(copy)
        code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
        assert code == 2 and f"is in use by pid {holder.pid}" in err and "Traceback" not in err
        assert changes(before, copy) == ([], [])
    finally:
        holder.kill()
        holder.wait()

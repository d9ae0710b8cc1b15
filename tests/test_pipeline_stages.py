"""How `pipeline` builds and runs its stages: data precedence, the dry run, divergence, experts side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from helpers.cli import run_main
from helpers.pipelines import write_configs

from askexpert.pipeline.prepare import prepare
from askexpert.pipeline.settings import explicit_data_keys, parser


def tiny_pipeline(folder: Path, **changes) -> Path:
    """The tiny pipeline of test_pipeline (micro ViTs, one epoch), with 2 experts and no static baseline."""
    path = write_configs(folder)
    config = yaml.safe_load(path.read_text())
    config.update({"static_baseline": False, **changes})
    path.write_text(yaml.safe_dump(config))
    return path


def planned(argv: list[str]) -> dict[str, dict]:
    """Each stage's resolved config, as a dry run plans it (nothing is written)."""
    settings = parser().parse_args(argv)
    prepared = prepare(settings, False, explicit_data=explicit_data_keys(argv), dry_run=True)
    return {stage.name: stage.config for stage in prepared.stages}


def test_specialization_args_reach_the_strategys_experts_only(tmp_path):
    config = tiny_pipeline(tmp_path, static_baseline=True)
    argv = ["--config", str(config), "--out", str(tmp_path / "run")]
    default = planned(argv)
    tuned = planned([*argv, "--specialization_args", '{"floor": 0.2, "decay_end": 0.5}'])
    assert tuned["experts/progressive/0"]["specialization"]["init_args"]["floor"] == 0.2
    assert tuned["experts/progressive/0"]["specialization"]["init_args"]["decay_end"] == 0.5
    assert default["experts/progressive/0"]["specialization"]["init_args"]["floor"] == 0.05
    # the static baseline is the same stage either way (an ablation store shares it between the two)
    assert tuned["experts/static/0"] == default["experts/static/0"]
    assert tuned["generalist"] == default["generalist"] and tuned["base"] == default["base"]
    from askexpert.errors import UserError

    with pytest.raises(UserError, match="stage experts/progressive/0: .*'flor' is not accepted"):
        planned([*argv, "--specialization_args", '{"flor": 0.2}'])


# -- which data settings a stage gets ----------------------------------------------------------------------
def test_a_stage_files_batch_size_survives_the_pipelines_defaults(tmp_path):
    config = tiny_pipeline(tmp_path)  # the stage files set batch_size 64; the pipeline's data section does not
    stages = planned(["--config", str(config), "--out", str(tmp_path / "run")])
    assert stages["generalist"]["data"]["batch_size"] == 64
    assert stages["experts/progressive/0"]["data"]["eval_batch_size"] == 256


@pytest.mark.parametrize("explicit", [32, 128])  # 128 is the DataModule's default: explicit still wins
def test_a_value_the_pipeline_sets_explicitly_wins_over_the_stage_file(tmp_path, explicit):
    config = tiny_pipeline(tmp_path)
    on_command_line = ["--config", str(config), "--out", str(tmp_path / "a"), "--data.batch_size", str(explicit)]
    assert planned(on_command_line)["base"]["data"]["batch_size"] == explicit
    in_the_file = yaml.safe_load(config.read_text())
    in_the_file["data"]["batch_size"] = explicit
    config.write_text(yaml.safe_dump(in_the_file))
    stages = planned(["--config", str(config), "--out", str(tmp_path / "b")])
    assert stages["generalist"]["data"]["batch_size"] == explicit


def test_a_stage_files_relative_root_is_the_same_as_the_pipelines_absolute_one(tmp_path, monkeypatch):
    from askexpert.pipeline.settings import FitStage
    from askexpert.pipeline.stage_arguments import fit_arguments as _fit_arguments

    monkeypatch.chdir(tmp_path)
    stage_file = tmp_path / "stage.yaml"
    stage_file.write_text(yaml.safe_dump({"data": {"root": "data/x", "image_size": "${model.init_args.img_size}"}}))
    data = {"source": "imagefolder", "root": str(tmp_path / "data" / "x"), "image_size": 32}
    args = _fit_arguments(FitStage(config=[str(stage_file)]), "generalist", data, set(), 0, "out", None)
    assert f"--data.root={tmp_path / 'data' / 'x'}" in args
    data["root"] = str(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="sets data.root to 'data/x'"):
        _fit_arguments(FitStage(config=[str(stage_file)]), "generalist", data, set(), 0, "out", None)


def test_stage_overrides_win_and_the_pipeline_owns_seed_and_folder(tmp_path):
    config = tiny_pipeline(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["generalist"]["overrides"] = {"data.batch_size": 16}
    config.write_text(yaml.safe_dump(settings))
    out = tmp_path / "run"
    stages = planned(["--config", str(config), "--out", str(out), "--data.batch_size", "32", "--seed", "3"])
    assert stages["generalist"]["data"]["batch_size"] == 16
    assert stages["base"]["data"]["batch_size"] == 32
    assert stages["generalist"]["seed_everything"] == 3  # the stage file says 0
    assert stages["base"]["trainer"]["default_root_dir"] == str(out / "base")


def test_a_stage_file_with_another_dataset_is_refused_in_one_line(tmp_path, capsys):
    config = tiny_pipeline(tmp_path)
    stage = yaml.safe_load((tmp_path / "base.yaml").read_text())
    stage["data"]["synthetic_train_per_class"] = 10  # the same as the pipeline's: accepted
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(stage))
    planned(["--config", str(config), "--out", str(tmp_path / "ok")])
    stage["data"]["synthetic_train_per_class"] = 12
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(stage))
    out = tmp_path / "run"
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"base.config {tmp_path / 'base.yaml'} sets data.synthetic_train_per_class to 12" in err
    assert "the pipeline's is 10" in err and not out.exists()


# -- the dry run -------------------------------------------------------------------------------------------
def test_dry_run_prints_every_stages_essentials_and_writes_nothing(tmp_path, capsys):
    config = tiny_pipeline(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(out), "--dry_run", "true"], capsys)
    assert code == 0, err
    assert not out.exists()
    lines = stdout.strip().splitlines()
    assert lines[1].split() == "stage model batch lr warm-up epochs precision device clip status".split()
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert list(rows) == ["generalist", "base", "partition", "experts/progressive/0", "experts/progressive/1"]
    assert rows["generalist"][1:8] == ["GeneralistModule", "vit_micro_patch8_32", "64", "0.001", "0.0", "1", "32-true"]
    assert rows["experts/progressive/1"][-3:] == ["none", "to", "train"]
    assert "x 3 batches" in " ".join(rows["experts/progressive/0"])
    assert lines[-1] == "dry run: nothing was trained or written"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_config_dry_runs_here(path, monkeypatch, capsys):
    """GPU configs too: models and data are built, but no GPU trainer (real datasets are not here)."""
    monkeypatch.chdir(REPO)
    argv = ["pipeline", "--config", str(path), "--out", "runs/never", "--dry_run", "true"]
    code, stdout, err = run_main([*argv, "--data.source", "synthetic", "--data.root", "null"], capsys)
    assert code == 0, err
    settings = yaml.safe_load(path.read_text())
    for stage in ("generalist", "base"):
        row = next(line for line in stdout.splitlines() if line.startswith(stage + " "))
        model = yaml.safe_load(Path(REPO / settings[stage]["config"][-1]).read_text())["model"]["init_args"]
        assert settings[stage].get("overrides", {}).get("model.init_args.model_name", model["model_name"]) in row
    if "gpu" in json.dumps(settings) or "cifar100" in path.name:
        assert "bf16-mixed" in stdout and "gpu:1" in stdout
    assert not (REPO / "runs" / "never").exists()


def test_a_gpu_config_without_a_gpu_fails_in_one_line_unless_dry_run(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    argv = ["pipeline", "--config", "configs/pipeline/cifar100.yaml", "--out", str(out)]
    code, _, err = run_main([*argv, "--data.source", "synthetic", "--data.root", "null"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "stage generalist:" in err and "--dry_run true" in err and not out.exists()


# -- divergence ---------------------------------------------------------------------------------------------
def test_a_diverging_stage_stops_the_pipeline_and_a_new_config_retrains_it(tmp_path, capsys):
    config = tiny_pipeline(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["base"]["overrides"] = {"model.init_args.lr": 1e30}
    config.write_text(yaml.safe_dump(settings))
    out = tmp_path / "run"
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(out)], capsys)
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("askexpert: error: stage base diverged, so nothing was evaluated: training diverged in ")
    assert "non-finite loss at step" in line and "--model.lr, now 1e+30" in line
    assert "experts/progressive/0" not in stdout  # nothing after the diverged stage ran
    assert not (out / "report.json").exists() and not (out / "logits").exists()
    record = json.loads((out / "stages.json").read_text())
    assert record["generalist"]["done"] and not record["base"]["done"] and record["base"]["diverged"]["step"] >= 1
    assert not (out / "base" / "checkpoints").exists()  # it diverged in its first epoch: nothing saved
    code, _, err = run_main(["evaluate", "--run", str(out)], capsys)  # no result to evaluate
    assert code == 2 and f"stage base of {out} diverged (step " in err
    # a fixed learning rate is a new config for the diverged stage only: no --overwrite needed
    settings["base"]["overrides"] = {"model.init_args.lr": 1e-3}
    config.write_text(yaml.safe_dump(settings))
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(out)], capsys)
    assert code == 0, err
    assert "generalist: done, config unchanged, skipped" in stdout and "] base: running" in stdout
    assert (out / "report.json").exists()
    assert "diverged" not in json.loads((out / "stages.json").read_text())["base"]


# -- experts side by side --------------------------------------------------------------------------------
# slow (~33 s): trains the experts twice; the launcher itself is covered by the experts tests in the default run
@pytest.mark.slow
def test_experts_trained_side_by_side_equal_experts_trained_one_after_another(tmp_path, capsys):
    config = tiny_pipeline(tmp_path)
    sequential = tmp_path / "sequential"
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(sequential)], capsys)
    assert code == 0, err
    # the same run with its experts forgotten, trained again two at a time in their own processes
    side_by_side = tmp_path / "side_by_side"
    shutil.copytree(sequential, side_by_side, ignore=shutil.ignore_patterns("experts", "logits", "report.*"))
    record = json.loads((side_by_side / "stages.json").read_text())
    (side_by_side / "stages.json").write_text(json.dumps({k: v for k, v in record.items() if "experts" not in k}))
    argv = ["pipeline", "--config", str(config), "--out", str(side_by_side), "--parallel_experts", "2"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    assert "experts/progressive/0: training on this machine" in stdout
    runs = (sequential, side_by_side)
    for i in (0, 1):
        folder = Path("experts", "progressive", str(i))
        assert (side_by_side / folder / "fit.log").exists()
        one, other = (torch.load(run / folder / "checkpoints" / "best.ckpt", weights_only=True) for run in runs)
        assert one["state_dict"].keys() == other["state_dict"].keys()
        assert all(torch.equal(one["state_dict"][k], other["state_dict"][k]) for k in one["state_dict"])
    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    assert reports[0]["selected"] == reports[1]["selected"]
    records = [json.loads((run / "stages.json").read_text()) for run in runs]
    assert "side_by_side" not in records[0]["experts/progressive/0"]  # its seconds are its own
    assert records[1]["experts/progressive/0"]["side_by_side"] == 2  # its seconds overlap the other expert's

"""The submitit launcher without a scheduler: its settings, the job graph, the driver on submitit's debug executor
(the same StageJob a SLURM job runs, in this process) and the pieces that read SLURM's answers. The same jobs under a
real SLURM cluster: tests/test_cluster_launcher.py (marker `cluster`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers.cli import one_line, run_main
from helpers.pipelines import write_configs

from askexpert.pipeline.launcher_settings import LauncherSettings, launcher_shorthand

DEBUG = ["--launcher", "submitit", "--launcher.cluster", "debug"]


def _report(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    report.pop("provenance")  # the commit and host it ran on
    return report


# -- settings ----------------------------------------------------------------------------------------------------
def test_launcher_shorthand_names_and_files():
    assert launcher_shorthand(["--launcher", "submitit", "--out", "x"]) == ["--launcher.name=submitit", "--out", "x"]
    assert launcher_shorthand(["--launcher=local"]) == ["--launcher.name=local"]
    # a path stays a config file of the group
    assert launcher_shorthand(["--launcher", "configs/launcher/slurm.yaml"]) == [
        "--launcher",
        "configs/launcher/slurm.yaml",
    ]


def test_the_shipped_slurm_config_is_the_defaults_of_launcher_submitit():
    shipped = yaml.safe_load((REPO / "configs" / "launcher" / "slurm.yaml").read_text())
    defaults = vars(LauncherSettings())
    assert set(shipped) == set(defaults)
    assert {k: v for k, v in shipped.items() if v != defaults[k]} == {"name": "submitit"}
    assert defaults["gpus_per_fit"] == 1  # one GPU per fit


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--launcher.cpus_per_fit", "0"], "--launcher.cpus_per_fit must be a whole number, 1 or more"),
        (["--launcher.mem_gb", "-1"], "--launcher.mem_gb must be positive"),
        (["--launcher.poll_s", "0"], "--launcher.poll_s must be a positive number of seconds"),
        (["--launcher.poll_s", "inf"], "launcher.poll_s"),  # jsonargparse's own line, or ours
        (["--launcher.mem_gb", "inf"], "launcher.mem_gb"),
        (["--launcher.sbatch", "{dependency: afterok:1}"], "--launcher.sbatch sets dependency, which the launcher"),
    ],
)
def test_bad_launcher_settings_are_one_line(tmp_path, capsys, option, fragment):
    config = write_configs(tmp_path)
    code, _, err = run_main(
        ["pipeline", "--config", str(config), "--out", str(tmp_path / "run"), *DEBUG, *option], capsys
    )
    one_line(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_nothing_imports_submitit_unless_the_launcher_is_used(tmp_path):
    config = write_configs(tmp_path)
    code = (
        "import sys\n"
        "import askexpert.commands.pipeline, askexpert.commands.ablate, askexpert.cluster.launch\n"
        "from askexpert.pipeline.settings import parse_settings\n"
        "from askexpert.pipeline.launcher_settings import launcher_settings\n"
        f"settings, _ = parse_settings(['--config', {str(config)!r}, '--out', 'x', '--launcher', 'submitit'])\n"
        "assert launcher_settings(settings.launcher).name == 'submitit'\n"
        "assert 'submitit' not in sys.modules, 'submitit imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO)


# -- the job graph -------------------------------------------------------------------------------------------------
def test_ablate_dry_run_prints_the_job_graph_and_submits_nothing(tmp_path, capsys):
    config = write_configs(tmp_path)
    ablation = tmp_path / "ablation.yaml"
    spec = {"pipeline": str(config), "seeds": [0], "grid": {"specialization": ["static", "progressive"]}}
    spec["fixed"] = {"static_baseline": False, "partition.method": "confusion"}
    ablation.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    code, stdout, err = run_main(
        ["ablate", "--config", str(ablation), "--out", str(out), "--launcher", "submitit", "--dry_run", "true"], capsys
    )
    assert code == 0, err
    lines = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("  ") and " after: " in line}
    assert (
        len(lines) == 7 and "job graph: 7 stages, 7 to submit" in stdout
    )  # 1 generalist, base, partition; 2 x 2 experts
    by_kind = {key.rsplit("-", 1)[0]: line for key, line in lines.items()}
    generalist, base = (next(k for k in lines if k.startswith(n)) for n in ("generalist-", "base-"))
    partition = next(k for k in lines if k.startswith("partition-"))
    assert "after: -; shared by 2 runs" in by_kind["generalist"] and "after: -; shared by 2 runs" in by_kind["base"]
    assert f"after: {generalist}; shared by 2 runs" in lines[partition]  # confusion reads the generalist
    experts = [line for key, line in lines.items() if key.startswith("experts-")]
    # each expert waits for the base model and the partition only (not for expert 0 of its family)
    assert len(experts) == 4 and all(line.endswith(f"after: {base}, {partition}") for line in experts)
    assert "dry run: no job was submitted" in stdout and not out.exists()


def test_a_fit_on_several_devices_is_refused_with_one_line(tmp_path, capsys):
    config = write_configs(tmp_path)
    args = ["pipeline", "--config", str(config), "--out", str(tmp_path / "run"), *DEBUG]
    code, _, err = run_main([*args, "--base.overrides", "{trainer.devices: 2}"], capsys)
    one_line(code, err, "stage base trains on 2 devices x 1 nodes", "docs/cluster.md")


# -- the driver on submitit's debug executor ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """The session's tiny pipeline config run through the submitit launcher (debug executor)."""
    from askexpert.cli import cli_main

    folder = tmp_path_factory.mktemp("launcher")
    config = write_configs(folder)
    cli_main(["pipeline", "--config", str(config), "--out", str(folder / "run"), *DEBUG])
    return config, folder / "run"


def test_a_submitit_pipeline_reports_what_the_local_launcher_reports(debug_run, tiny_pipeline_run):
    _, run = debug_run
    _, local = tiny_pipeline_run
    assert _report(run) == _report(local)
    stages = json.loads((run / "stages.json").read_text())
    assert all(entry["done"] and entry["seconds"] >= 0 for entry in stages.values())
    # the stages live in the run's own store, its stage folders link there; pipeline.yaml says nothing of launchers
    assert os.path.islink(run / "generalist") and (run / "store" / "jobs" / "jobs.json").is_file()
    assert "launcher" not in yaml.safe_load((run / "pipeline.yaml").read_text())


def test_a_rerun_submits_only_what_is_missing(debug_run, tmp_path, capsys):
    import shutil

    config, finished = debug_run
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    marker = next((run / "store").glob("experts-static-1-*.done"))
    marker.unlink()  # as if its job had been killed
    kept = {p.name: p.read_text() for p in (run / "store").glob("*.done")}
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(run), *DEBUG], capsys)
    assert code == 0, err
    submitted = [line for line in stdout.splitlines() if ": submitted as job " in line]
    assert len(submitted) == 1 and submitted[0].startswith(marker.stem)
    assert {p.name: p.read_text() for p in (run / "store").glob("*.done") if p.name in kept} == kept
    assert _report(run) == _report(finished)


def test_failed_jobs_block_their_dependants_and_stop_with_one_line(tmp_path, capsys):
    config = write_configs(tmp_path)
    spec = yaml.safe_load(config.read_text())
    spec["static_baseline"] = False
    spec["experts"]["overrides"]["trainer.limit_val_batches"] = 0  # no validation: no best.ckpt, the fit fails
    config.write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(run), *DEBUG], capsys)
    failures = [line for line in stdout.splitlines() if " failed (job DEBUG_" in line]
    assert len(failures) == 2 and all(
        "finished without a best checkpoint" in line and "(log: " in line for line in failures
    )
    last = err.strip().splitlines()[-1]  # after the fits' own warnings
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("askexpert: error: 2 stage job(s) failed, nothing was evaluated; first: stage experts-"), (
        last
    )
    assert not (run / "report.json").exists()
    # recorded in the run's stages.json: evaluate refuses the run, saying which stage has not finished
    stages = json.loads((run / "stages.json").read_text())
    assert "finished without a best checkpoint" in stages["experts/progressive/0"]["failed"]
    assert stages["base"]["done"] and not stages["experts/progressive/1"]["done"]
    code, _, err = run_main(["evaluate", "--run", str(run)], capsys)
    one_line(code, err, "stage experts/progressive/0 of", "has not finished")


def test_a_diverged_job_is_recorded_its_cell_listed_and_the_other_cells_finish(tmp_path, capsys):
    config = write_configs(tmp_path)
    ablation = tmp_path / "ablation.yaml"
    spec = {"pipeline": str(config), "seeds": [0], "grid": {"base.overrides.model.init_args.lr": [1e30, 1e-3]}}
    spec["fixed"] = {"static_baseline": False}
    ablation.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    code, stdout, err = run_main(["ablate", "--config", str(ablation), "--out", str(out), *DEBUG], capsys)
    assert code == 3 and err.strip().splitlines()[-1].startswith("askexpert: error: 1 of 2 runs diverged ("), err
    assert stdout.count(": DIVERGED (job DEBUG_") == 1 and stdout.count("not started (base-") == 2
    assert stdout.count(": submitted as job ") == 1 + 2 + 1 + 2  # generalist, 2 bases, partition, 2 experts
    cell = json.loads(next((out / "cells").glob("base.lr=1e+30/seed0/cell.json")).read_text())
    assert cell["diverged"]["stage"] == "base" and cell["rows"] == []
    assert "1 of 2 runs finished, 1 diverged" in (out / "results.md").read_text()
    stages = json.loads(next((out / "cells").glob("base.lr=1e+30/seed0/stages.json")).read_text())
    assert stages["base"]["diverged"]["step"] >= 0 and stages["experts/progressive/0"]["not_started"]


def test_a_stage_job_asks_to_be_requeued_as_itself():
    from askexpert.cluster.stage_job import StageJob

    job = StageJob("base-0", None, [], "run", None, "store")
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}


# -- what the driver reads from SLURM ----------------------------------------------------------------------------
def _fake_command(folder: Path, name: str, output: str) -> None:
    script = folder / name
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_squeue_states_decide_which_jobs_are_alive(tmp_path, monkeypatch):
    from askexpert.cluster.scheduler import _squeue_alive

    _fake_command(tmp_path, "squeue", "12_0 RUNNING\n12_1 PENDING\n13 COMPLETING\n14 REQUEUED")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _squeue_alive(["12_0", "12_1", "13", "14", "15", "16_2"]) == {"12_0", "12_1", "13", "14"}
    assert _squeue_alive(["12"]) == {"12"}  # an array by its job id: alive while a task is


def test_slurm_parameters_wait_afterok_and_ask_no_gpu_for_a_cpu_stage(tmp_path, monkeypatch):
    from askexpert.cluster.scheduler import Scheduler

    _fake_command(tmp_path, "sbatch", "")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    settings = LauncherSettings(name="submitit", partition="gpu", qos="high", sbatch={"constraint": "a100"})
    scheduler = Scheduler(settings, str(tmp_path / "jobs"))
    after = scheduler._parameters(["5", "6_1"], cpu_only=False)
    assert after["slurm_dependency"] == "afterok:5:6_1" and after["gpus_per_node"] == 1
    assert after["slurm_additional_parameters"] == {"constraint": "a100", "kill-on-invalid-dep": "yes"}
    assert after["slurm_partition"] == "gpu" and after["slurm_qos"] == "high" and after["timeout_min"] == 240
    first = scheduler._parameters([], cpu_only=True)
    assert first["gpus_per_node"] == 0 and "slurm_dependency" not in first


def test_failure_reason_is_the_last_error_line_of_a_jobs_log(tmp_path):
    from askexpert.cluster.scheduler import failure_reason

    log = tmp_path / "7_0_0_log.err"
    log.write_text(
        "submitit ERROR (2026-12-07 10:00:00) - Submitted job triggered an exception\n"
        'Traceback (most recent call last):\n  File "x.py", line 1\nraise UserError(...)\n'
        "askexpert.errors.UserError: stage base finished without a best checkpoint\n"
    )
    assert failure_reason(str(log)) == "stage base finished without a best checkpoint"
    log.write_text("slurmstepd: error: *** JOB 12 ON vm CANCELLED AT 2026-12-07T10:00:00 ***\n")
    assert failure_reason(str(log)) == "slurmstepd: error: *** JOB 12 ON vm CANCELLED AT 2026-12-07T10:00:00 ***"
    assert failure_reason(str(tmp_path / "none.err")).startswith("no log (the job never started")


def test_a_run_of_the_local_launcher_goes_on_with_submitit_without_training_again(tiny_pipeline_run, tmp_path, capsys):
    import shutil

    config, finished = tiny_pipeline_run
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(run), *DEBUG], capsys)
    assert code == 0, err
    assert ": submitted as job " not in stdout and stdout.count("done, config unchanged, skipped") == 7
    assert os.path.islink(run / "base") and (run / "base" / "checkpoints" / "best.ckpt").is_file()
    assert _report(run) == _report(finished)


def test_without_sbatch_the_slurm_launcher_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    config = write_configs(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run = tmp_path / "run"
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(run), "--launcher", "submitit"], capsys)
    one_line(code, err, "sbatch is not on PATH here", "--launcher.cluster local")
    assert not run.exists()

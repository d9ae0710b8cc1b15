"""W&B as its users expect (askexpert/pipeline/wandb_runs.py): every stage of a pipeline run, and its evaluation,
is a W&B run of the run's group, with the stage's kind as job type, a readable name and tags; given as W&B's
environment variables, so no stage's identity changes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers.pipelines import write_configs
from jsonargparse import Namespace

from askexpert.pipeline.stages import Stage, StageKind
from askexpert.pipeline.wandb_runs import WANDB_ENV, report_run, run_group, stage_environment, wandb_stage_env
from askexpert.runs.layout import RunLayout


def _settings(**extra) -> Namespace:
    values = {"seed": 3, "specialization": "progressive", "partition": Namespace(method="superclass")}
    return Namespace(**{"wandb_project": "proj", "wandb_entity": None, **values, **extra})


EXPERT = Stage("experts/progressive/1", StageKind.EXPERT, {}, [], ["fit"], identity="abc")


def test_the_env_of_a_stage_names_its_group_kind_run_and_tags(tmp_path):
    layout = RunLayout(str(tmp_path / "demo"))
    env = wandb_stage_env(EXPERT, _settings(), layout)
    assert env == {
        "WANDB_RUN_GROUP": "demo",
        "WANDB_JOB_TYPE": "experts",
        "WANDB_NAME": "experts/progressive/1 seed3",
        "WANDB_TAGS": "seed3,specialization:progressive,partition:superclass",
    }
    base = Stage("base", StageKind.BASE, {}, [], ["fit"])
    assert wandb_stage_env(base, _settings(wandb_entity="team"), layout)["WANDB_ENTITY"] == "team"
    assert wandb_stage_env(base, _settings(), layout)["WANDB_JOB_TYPE"] == "base"
    partition = Stage("partition", StageKind.PARTITION, {}, [])
    assert wandb_stage_env(partition, _settings(), layout) == {}  # not a fit
    assert wandb_stage_env(EXPERT, _settings(wandb_project=None), layout) == {}  # W&B off: nothing set


def test_an_ablation_cell_is_grouped_by_ablation_cell_and_seed(tmp_path):
    cell = tmp_path / "strategies" / "cells" / "specialization=full" / "seed1"
    assert run_group(str(cell)) == "strategies/specialization=full/seed1"
    assert run_group(str(tmp_path / "runs" / "demo")) == "demo"
    evaluation = report_run(_settings(), RunLayout(str(cell)), str(cell))
    assert evaluation["group"] == "strategies/specialization=full/seed1" and evaluation["job_type"] == "evaluation"
    assert evaluation["name"] == "evaluation seed3" and "seed3" in evaluation["tags"]


def test_the_environment_is_restored_after_an_in_process_fit(monkeypatch):
    monkeypatch.setenv("WANDB_NAME", "mine")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    with stage_environment({"WANDB_NAME": "stage", "WANDB_RUN_GROUP": "run"}):
        assert os.environ["WANDB_NAME"] == "stage" and os.environ["WANDB_RUN_GROUP"] == "run"
    assert os.environ["WANDB_NAME"] == "mine" and "WANDB_RUN_GROUP" not in os.environ


def test_a_side_by_side_child_gets_the_stage_env(tmp_path):
    from askexpert.pipeline.launcher import Job, fit_job, launch_jobs

    env = {"WANDB_RUN_GROUP": "demo", "WANDB_NAME": "experts/progressive/0 seed0"}
    assert fit_job("e", ["fit"], str(tmp_path), env).env == env
    script = "import os; print(os.environ['WANDB_RUN_GROUP'], os.environ['WANDB_NAME'])"
    job = Job("e", [sys.executable, "-c", script], str(tmp_path / "fit.log"), env)
    assert launch_jobs([job], [None], poll_seconds=0.05) == {"e": 0}
    assert (tmp_path / "fit.log").read_text().strip() == "demo experts/progressive/0 seed0"


def test_a_submitit_job_trains_with_the_stage_env(tmp_path, monkeypatch):
    from askexpert.cluster.stage_job import StageJob

    seen = {}

    def train(self, store):
        seen.update({name: os.environ.get(name) for name in WANDB_ENV})
        return False

    monkeypatch.setattr(StageJob, "_train", train)
    monkeypatch.setattr(StageJob, "_link_run_folder", lambda self, store: None)
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    job = StageJob("experts-1", EXPERT, [], str(tmp_path / "run"), _settings(), str(tmp_path / "store"))
    assert job() == "done"
    assert seen["WANDB_RUN_GROUP"] == "run" and seen["WANDB_JOB_TYPE"] == "experts"
    assert not any(name in os.environ for name in WANDB_ENV)  # as it was (a debug job runs in this process)


def test_ablate_passes_its_wandb_options_to_every_cell_and_nothing_when_unset():
    from askexpert.ablation.tracking import wandb_arguments
    from askexpert.commands.ablate import parser

    base = ["--pipeline", "p.yaml", "--grid", "{}", "--out", "o"]
    assert wandb_arguments(parser().parse_args(base)) == []  # a cell's settings and identity as before
    args = parser().parse_args([*base, "--wandb_project", "proj", "--wandb_entity", "team"])
    assert wandb_arguments(args) == ["--wandb_project", "proj", "--wandb_entity", "team"]


def test_an_offline_pipeline_logs_each_stage_to_the_run_group(tmp_path, monkeypatch):
    """The pipeline's in-process fits, each standing in for Lightning's WandbLogger with the same `wandb.init`
    (project and folder only): W&B takes the group, job type, name, tags and entity from the stage's env."""
    import wandb

    from askexpert.pipeline import runner
    from askexpert.pipeline.prepare import prepare
    from askexpert.pipeline.settings import parse_settings

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by the policy, with no login
    seen = {}

    def fit(args):
        root = args[args.index("--trainer.default_root_dir") + 1]
        assert '"project": "p"' in next(a for a in args if a.startswith("--trainer.logger="))
        run = wandb.init(project="p", dir=root, mode="offline")  # what WandbLogger passes, W&B's env the rest
        seen[run.name] = (run.group, run.job_type, list(run.tags), run.entity)
        # the pipeline finishes the run the fit left open (WandbLogger does not)
        best = Path(RunLayout(str(tmp_path / "myrun")).best(root))
        best.parent.mkdir(parents=True, exist_ok=True)
        best.write_bytes(b"")

    monkeypatch.setattr(runner, "run_lightning_command", fit)
    argv = ["--config", str(write_configs(tmp_path)), "--out", str(tmp_path / "myrun"), "--static_baseline", "false"]
    argv += ["--wandb_project", "p"]
    settings, explicit = parse_settings([*argv, "--wandb_entity", "team"])
    prepared = prepare(settings, False, {}, explicit, dry_run=True)
    runner.execute(prepared)
    tags = ["seed0", "specialization:progressive", "partition:superclass"]
    assert seen == {
        "generalist seed0": ("myrun", "generalist", tags, "team"),
        "base seed0": ("myrun", "base", tags, "team"),
        "experts/progressive/0 seed0": ("myrun", "experts", tags, "team"),
        "experts/progressive/1 seed0": ("myrun", "experts", tags, "team"),
    }
    assert wandb.run is None and not any(name in os.environ for name in WANDB_ENV)
    assert len(list((tmp_path / "myrun" / "experts" / "progressive" / "1" / "wandb").glob("offline-run-*"))) == 1
    # the entity and W&B's names are no part of a stage's identity (its fit arguments); the project is (its logger)
    settings, explicit = parse_settings(argv)
    unchanged = prepare(settings, False, {}, explicit, dry_run=True).stages
    assert [(s.name, s.identity) for s in unchanged] == [(s.name, s.identity) for s in prepared.stages]
    assert not any("WANDB" in arg or "group" in arg for s in unchanged for arg in s.fit_args)


def test_the_moved_sweep_fit_config_is_where_the_sweeps_name_it():
    import yaml
    from conftest import REPO

    for sweep in ("progressive_schedule", "expert_distillation"):
        command = yaml.safe_load((REPO / "configs" / "sweeps" / f"{sweep}.yaml").read_text())["command"]
        fit_config = command[command.index("--config") + 1]
        assert fit_config == "configs/expert_demo_sweep_fit.yaml" and (REPO / fit_config).is_file()
    assert not Path(REPO / "configs" / "sweeps" / "expert_demo_fit.yaml").exists()

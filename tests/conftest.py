"""Shared fixtures: a tiny CPU configuration (micro ViT, a few stand-in images per class, one epoch)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"

# W&B must never reach the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The suite writes about a hundred tiny reports: their diagnostic plots (1.3 s each) are drawn only where a test
# asks for them (tests/test_report_plots.py turns them on; `plots_on` below).
os.environ.setdefault("ASKEXPERT_REPORT_PLOTS", "0")


@pytest.fixture
def plots_on(monkeypatch):
    """Reports written in this test get the diagnostic plots (askexpert/collab/report.py)."""
    monkeypatch.setenv("ASKEXPERT_REPORT_PLOTS", "1")

TINY_ARGS = [
    "--seed_everything",
    "0",
    "--model.model_name",
    "vit_micro_patch8_32",
    "--model.warmup_epochs",
    "0",
    "--data.synthetic_train_per_class",
    "10",
    "--data.synthetic_test_per_class",
    "2",
    "--data.batch_size",
    "64",
    "--data.eval_batch_size",
    "256",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.log_every_n_steps",
    "1",
]


def load_script(path: Path):
    """A script of benchmarks/ or experiments/ as a module (they are not a package), to call its functions."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_args():
    """Arguments that make any `fit`/`test` run take about a second on CPU."""
    return list(TINY_ARGS)


def run_subprocess_env() -> dict:
    """Environment for running `python -m askexpert` as a user would, plus the test helpers on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HELPERS), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture
def cli_env():
    return run_subprocess_env()


@pytest.fixture
def python():
    return sys.executable


@pytest.fixture(scope="session")
def tiny_generalist_run(tmp_path_factory) -> Path:
    """One tiny generalist `fit` (TINY_ARGS: one epoch; best.ckpt, and last.ckpt with optimizer, scheduler, loop and
    callback states), trained once per test session and shared by every module that needs a trained generalist.
    Read-only: a test that changes it copies it first."""
    from askexpert.cli import cli_main

    root = tmp_path_factory.mktemp("tiny_generalist") / "generalist"
    cli_main(["fit", *TINY_ARGS, "--trainer.default_root_dir", str(root)])
    return root


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory) -> tuple[Path, Path]:
    """(pipeline config, finished run folder) of one tiny stand-in pipeline (micro ViTs, 2 experts, one epoch per
    stage), run once per test session and shared by the pipeline, evaluate, route, profile and export tests.
    Read-only: a test that changes it copies it first."""
    from helpers.pipelines import write_configs

    from askexpert.cli import cli_main

    folder = tmp_path_factory.mktemp("pipeline")
    config = write_configs(folder)
    out = folder / "run"
    cli_main(["pipeline", "--config", str(config), "--out", str(out)])
    return config, out


@pytest.fixture(scope="session")
def tiny_export(tiny_pipeline_run, tmp_path_factory) -> tuple[Path, dict]:
    """(export folder, manifest) of the session's tiny pipeline run, shared by the export and deploy tests.
    Read-only: a test that changes it copies it first."""
    from askexpert.cli import cli_main

    _, run = tiny_pipeline_run
    out = tmp_path_factory.mktemp("export") / "system"
    manifest = cli_main(["export", "--run", str(run), "--out", str(out), "--int8", "true"])
    return out, manifest

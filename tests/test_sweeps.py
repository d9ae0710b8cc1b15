"""The shipped W&B sweeps work under `wandb agent` unchanged: every parameter value an agent can send is a
flag the targeted command accepts, and a run started the way an agent starts it logs the sweep's metric into
the agent's W&B run, in a folder of its own."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_ARGS
from helpers.cli import run_main

SWEEPS = sorted(p for p in (REPO / "configs" / "sweeps").glob("*.yaml") if "program" in yaml.safe_load(p.read_text()))
COMMANDS = ("fit", "validate", "test", "predict")


def test_sweeps_are_shipped():
    assert {p.stem for p in SWEEPS} >= {"generalist_lr", "progressive_schedule", "expert_distillation"}


def points(spec: dict) -> list:
    """Lower bound, midpoint and upper bound of a W&B parameter distribution (first, middle, last value)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        values = spec["values"]
        return [values[0], values[len(values) // 2], values[-1]]
    low, high = spec["min"], spec["max"]
    kind = spec.get("distribution") or ("int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if kind == "int_uniform":
        return [low, (low + high) // 2, high]
    if kind == "uniform":
        return [low, (low + high) / 2, high]
    if kind == "log_uniform_values":
        return [low, math.sqrt(low * high), high]
    raise AssertionError(f"distribution {kind} is not covered by this test; add it")


def agent_argv(sweep: dict, values: dict) -> list[str]:
    """The command line `wandb agent` would run, built with W&B's own helper (wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    variables.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    argv = []
    for chunk in create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        argv += variables.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return argv


def command_args(argv: list[str]) -> list[str]:
    """What `python -m askexpert` receives from an agent's command line."""
    assert argv[:4] == ["/usr/bin/env", "python", "-m", "askexpert"], argv
    return argv[4:]


def sampled(sweep: dict) -> list[dict]:
    params = sweep["parameters"]
    return [{name: points(spec)[min(i, len(points(spec)) - 1)] for name, spec in params.items()} for i in range(3)]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_what_wandb_agent_expects(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "askexpert"
    command = sweep["command"]
    assert command[:4] == ["${env}", "${interpreter}", "-m", "${program}"] and command[-1] == "${args}"
    assert command[4] in COMMANDS and command[5] == "--config"
    assert (REPO / command[6]).is_file()
    assert sweep["metric"]["goal"] in ("maximize", "minimize")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sampled_point_parses(path, monkeypatch):
    """Bounds and midpoint of every distribution, as an agent would pass them, accepted by the CLI parser."""
    from askexpert.cli import cli_main

    monkeypatch.chdir(REPO)
    sweep = yaml.safe_load(path.read_text())
    for values in sampled(sweep):
        args = command_args(agent_argv(sweep, values))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            cli_main([*args, "--print_config"])
        assert done.value.code in (0, None), (args, out.getvalue())
        config = yaml.safe_load(out.getvalue())
        for name, value in values.items():
            found = config
            for part in name.split("."):
                found = found[part]
            assert found == pytest.approx(value) if isinstance(value, float) else found == value, name


def test_a_parameter_that_is_not_a_flag_is_refused(monkeypatch):
    from askexpert.cli import cli_main
    from askexpert.errors import UserError

    monkeypatch.chdir(REPO)
    sweep = yaml.safe_load((REPO / "configs/sweeps/generalist_lr.yaml").read_text())
    args = command_args(agent_argv(sweep, {"model.init_args.learning_rate": 0.01}))
    with pytest.raises(UserError, match="learning_rate"):
        cli_main([*args, "--print_config"])


@pytest.fixture(scope="module")
def demo_checkout(tmp_path_factory, tiny_pipeline_run):
    """A folder that looks like an askexpert checkout after `make demo`: the base model and the partition of the
    session's tiny pipeline as runs/demo/base and runs/demo/partition.json (copied once; each test works in its
    own copy)."""
    _, run = tiny_pipeline_run
    folder = tmp_path_factory.mktemp("checkout")
    shutil.copytree(run / "base", folder / "runs" / "demo" / "base")
    shutil.copy(run / "partition.json", folder / "runs" / "demo" / "partition.json")
    return folder


@pytest.fixture
def demo_artefacts(demo_checkout, tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    shutil.copytree(demo_checkout, checkout)
    (checkout / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(checkout)
    return checkout


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_a_run_started_like_an_agent_logs_the_metric_to_its_own_run(path, demo_artefacts, monkeypatch, capsys):
    import wandb

    sweep = yaml.safe_load(path.read_text())
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "run45678")
    monkeypatch.setenv("WANDB_MODE", "offline")  # as the agent's environment would say, minus the network
    args = command_args(agent_argv(sweep, sampled(sweep)[1]))
    tiny = TINY_ARGS[2:]  # without --seed_everything
    assert TINY_ARGS[0] == "--seed_everything"
    code, _, err = run_main([*args, *tiny, "--trainer.limit_train_batches", "2"], capsys)  # as the agent's process
    assert code == 0, err
    wandb.finish()
    configured = yaml.safe_load((REPO / sweep["command"][6]).read_text())["trainer"]["default_root_dir"]
    root = Path(configured) / "sweep-sweep123" / "run45678"
    assert (root / "checkpoints" / "best.ckpt").is_file()
    with open(root / "metrics.csv") as handle:
        assert sweep["metric"]["name"] in next(csv.reader(handle))
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith("run45678")


def test_stages_run_in_process_are_not_moved_into_the_sweep(tmp_path, monkeypatch):
    """Only the agent's own `fit` is the sweep run; a pipeline's in-process stages keep their folders."""
    from askexpert.cli import cli_main

    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "run45678")
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "stage"
    cli = cli_main(["fit", *TINY_ARGS, "--trainer.default_root_dir", str(root)])
    assert Path(cli.trainer.default_root_dir) == root and (root / "checkpoints" / "best.ckpt").is_file()

"""`python -m askexpert`: the dispatcher, every shipped config, run folders, resume, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import run_main

from askexpert.cli import cli_main

REPO = Path(__file__).resolve().parent.parent
from conftest import TINY_ARGS  # noqa: E402

# Configs of later subcommands live in these folders and are checked by their own subcommand's tests.
NON_FIT_DIRS = ("pipeline", "ablations", "sweeps", "profiles", "launcher")
FIT_CONFIGS = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "configs").rglob("*.yaml")
    if not set(p.relative_to(REPO / "configs").parts) & set(NON_FIT_DIRS)
)


def test_help_lists_every_command(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in ("fit", "validate", "test", "predict"):
        assert f"  {command} " in out


def test_unknown_command_is_one_clear_line(capsys):
    code, _, err = run_main(["train"], capsys)
    assert code == 2
    commands = (
        "fit, validate, test, predict, partition, experts, pipeline, evaluate, ablate, route, profile, export, "
        "serve, edge, adapt"
    )
    assert err.strip() == f"askexpert: error: unknown command 'train'; commands: {commands}"


def test_there_is_a_cpu_generalist_config():
    assert any("generalist" in Path(c).name for c in FIT_CONFIGS)


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_fit_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(REPO / config), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "model:" in out and "data:" in out and "${" not in out


def test_interpolation_across_config_files(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("data:\n  seed: 7\n")
    (tmp_path / "b.yaml").write_text(
        "seed_everything: ${data.seed}\ntrainer:\n  default_root_dir: runs/s${data.seed}\n"
    )
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "seed_everything: 7" in out and "default_root_dir: runs/s7" in out


# -- a whole tiny run -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny generalist run (2 epochs), shared by the tests that inspect its folder."""
    from conftest import TINY_ARGS

    root = tmp_path_factory.mktemp("run")
    cli_main(["fit", *TINY_ARGS, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root)])
    return root


def test_fit_writes_one_fixed_run_folder(trained_run):
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "config.yaml").is_file()
    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert {row["epoch"] for row in rows if row.get("val/acc")} == {"0", "1"}
    assert not list(trained_run.glob("version_*")) and not (trained_run / "lightning_logs").exists()
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["askexpert_class"] == "askexpert.modules.generalist.GeneralistModule"


def test_test_command_reports_stand_in_accuracy(trained_run, capsys):
    from conftest import TINY_ARGS

    best = str(trained_run / "checkpoints" / "best.ckpt")
    code, out, _ = run_main(
        ["test", *TINY_ARGS, "--trainer.default_root_dir", str(trained_run), "--ckpt_path", best], capsys
    )
    assert code == 0
    assert "GeneralistModule test accuracy:" in out and "STAND-IN synthetic data, not CIFAR-100" in out
    result = json.loads((trained_run / "eval" / "test_results.json").read_text())
    assert (
        result["data"]["stand_in"] is True and result["data"]["test_size"] == 200 and result["data"]["val_size"] == 100
    )
    assert 0 <= result["metrics"]["test/acc"] <= 1 and "test/superclass_acc" in result["metrics"]


def test_predict_writes_a_csv(trained_run, tmp_path, capsys):
    from conftest import TINY_ARGS

    out_csv = tmp_path / "preds.csv"
    args = ["predict", *TINY_ARGS, "--trainer.default_root_dir", str(trained_run)]
    args += ["--ckpt_path", str(trained_run / "checkpoints" / "last.ckpt"), "--prediction_writer.output", str(out_csv)]
    code, _, _ = run_main(args, capsys)
    assert code == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 200
    assert set(rows[0]) == {"index", "prediction", "confidence", "label", "class_name"}
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)


def test_checkpoint_loads_for_prediction(trained_run):
    from askexpert.modules.loading import load_classifier

    model = load_classifier(str(trained_run / "checkpoints" / "best.ckpt"))
    logits = model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (4, 100)


@pytest.mark.slow  # tests/test_run_safety.py covers resuming (bit-identical) in the default run
def test_killed_run_resumes_at_the_next_epoch(tmp_path, cli_env):
    """SIGKILL during epoch 2, relaunch with --ckpt_path last: training continues at epoch 2, same folder."""
    from conftest import TINY_ARGS

    killer = tmp_path / "killer.yaml"
    killer.write_text(
        "trainer:\n  callbacks:\n    - class_path: killer.KillAtEpoch\n      init_args:\n        epoch: 2\n"
    )
    root = tmp_path / "run"
    base = [sys.executable, "-m", "askexpert", "fit", *TINY_ARGS, "--trainer.default_root_dir", str(root)]
    first = subprocess.run(
        [*base, "--config", str(killer), "--trainer.max_epochs", "4"],
        env=cli_env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert first.returncode == -9, first.stderr[-2000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    second = subprocess.run(
        [*base, "--trainer.max_epochs", "4", "--ckpt_path", "last"],
        env=cli_env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    epochs = [row["epoch"] for row in csv.DictReader(open(root / "metrics.csv")) if row.get("val/acc")]
    assert epochs == ["0", "1", "2", "3"]  # no epoch trained twice, none skipped
    assert not list(root.glob("version_*"))


def test_resumed_run_keeps_its_wandb_id(tmp_path, capsys, monkeypatch):
    from conftest import TINY_ARGS

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the framework's default, not the test's
    root = tmp_path / "run"
    args = [
        "fit",
        *TINY_ARGS,
        "--config",
        str(REPO / "configs/logger/wandb.yaml"),
        "--trainer.default_root_dir",
        str(root),
    ]
    assert run_main(args, capsys)[0] == 0
    run_id = (root / "wandb_id.txt").read_text().strip()
    import wandb

    wandb.finish()  # what the end of the first process would do
    assert run_main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"], capsys)[0] == 0
    assert (root / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted(p.name for p in (root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)
    assert (root / "metrics.csv").is_file()
    wandb.finish()
    # a fresh fit (no --ckpt_path) in the same folder is a new run: new id, new metrics file
    assert run_main(args, capsys)[0] == 0
    assert (root / "wandb_id.txt").read_text().strip() != run_id
    assert {row["epoch"] for row in csv.DictReader(open(root / "metrics.csv"))} == {"0"}
    wandb.finish()


@pytest.mark.slow
def test_one_model_trains_with_ddp_on_two_cpu_processes(tmp_path, cli_env):
    """Lightning's DDP from the command line (2 CPU processes stand in for 2 GPUs): loaders, metrics and
    checkpoints work across processes. About 30 s."""
    run_dir = tmp_path / "ddp"
    args = [sys.executable, "-m", "askexpert", "fit", *TINY_ARGS, "--trainer.devices", "2"]
    args += ["--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(run_dir)]
    done = subprocess.run(args, env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sync_dist=True" not in done.stderr  # metrics are reduced by torchmetrics, logged without warnings
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("val/acc")]
    assert [r["epoch"] for r in rows] == ["0", "1"]

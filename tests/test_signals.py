"""SIGTERM and SIGINT (issue 27, item 1 and 6): a training command exits 143 or 130 with one line saying how to
resume, a pipeline records the stage it stopped as interrupted and resumes it, a launcher stops its children, and an
export leaves no partial folder behind (nor does a killed one, for long)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import HELPERS, TINY_ARGS, run_subprocess_env
from helpers.cli import run_main
from helpers.pipelines import write_configs
from helpers.processes import dead_pid

import askexpert.cli
import askexpert.interrupts
from askexpert.cli import cli_main, on_interrupt
from askexpert.errors import UserError
from askexpert.files.atomic import TEMPORARY, staging_folder
from askexpert.interrupts import Interrupted, interruption, stop_on_signals
from askexpert.pipeline.record import check_finished
from askexpert.runs.layout import RunLayout

if str(HELPERS) not in sys.path:  # the signalling callback, named by configs that also run in this process
    sys.path.insert(0, str(HELPERS))


def signal_config(folder: Path, name: str = "SIGTERM") -> Path:
    """A config whose callback sends `name` to its own process before batch 1 of epoch 1, once
    (killer.SignalAtBatch; epoch 0 has saved last.ckpt by then)."""
    path = folder / "signal.yaml"
    callback = {"class_path": "killer.SignalAtBatch", "init_args": {"epoch": 1, "batch": 1, "signal": name}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return path


def signalled(command: list[str], folder: Path) -> subprocess.CompletedProcess:
    """`python -m askexpert ...` in a subprocess that sends itself a signal once (killer.SignalAtBatch)."""
    env = {**run_subprocess_env(), "KILL_ONCE_MARKER": str(folder / "signalled")}
    return subprocess.run([sys.executable, "-m", "askexpert", *command], env=env, capture_output=True, text=True)


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("askexpert:")]


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if TEMPORARY.search(p.name)]


# -- a real fit, stopped by SIGTERM --------------------------------------------------------------------------------
def test_sigterm_ends_a_fit_with_143_and_the_same_command_resumes_it(tmp_path):
    # ~15-20 s, most of it the subprocess importing torch: the one real-process check in the default run
    root = tmp_path / "run"
    args = ["fit", *TINY_ARGS, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3"]
    args += ["--config", str(signal_config(tmp_path)), "--trainer.default_root_dir", str(root)]
    done = signalled(args, tmp_path)
    assert done.returncode == 143, done.stderr[-3000:]
    assert our_lines(done.stderr) == [
        "askexpert: interrupted by SIGTERM; run the same command with --ckpt_path last to resume from its last.ckpt"
    ]
    assert "Traceback" not in done.stderr and not temporaries(root)
    # what the line says: the same command with --ckpt_path last resumes at epoch 1 (epoch 0 is not trained again)
    trainer = cli_main([*args, "--ckpt_path", "last"]).trainer
    assert trainer.current_epoch == 2
    with open(root / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]]
    assert steps == [0, 1, 2, 3, 4, 5]  # every step of both epochs logged once: epoch 1 from its start, once


# -- main, in this process -----------------------------------------------------------------------------------------
def with_run(monkeypatch, command: str, run) -> None:
    """`command`'s entry in the dispatcher, running `run(argv)` instead (everything else as it is)."""
    table = dict(askexpert.cli.EXTRA_COMMANDS)
    table[command] = dataclasses.replace(table[command], run=run)
    monkeypatch.setattr(askexpert.cli, "EXTRA_COMMANDS", table)


def signal_self(name: str):
    def run(argv):
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(10)  # the handler raises in this sleep
        raise AssertionError("the signal did not stop the command")

    return run


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_main_exits_128_plus_the_signal_with_one_line(monkeypatch, capsys, name, status):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with_run(monkeypatch, "evaluate", signal_self(name))
    code, _, err = run_main(["evaluate", "--run", "x"], capsys)
    assert code == status
    assert err.strip() == f"askexpert: interrupted by {name}; run the same command again"
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back


def test_a_signal_that_some_code_caught_or_turned_into_an_error_still_exits_non_zero(monkeypatch, capsys):
    def swallowed(argv):
        try:
            signal_self("SIGTERM")(argv)
        except Interrupted:
            return None  # e.g. a library's `except BaseException: pass`

    def turned_into_an_error(argv):
        try:
            signal_self("SIGINT")(argv)
        except Interrupted:
            raise RuntimeError("DataLoader worker (pid 1) exited unexpectedly") from None

    for run, status, name in ((swallowed, 143, "SIGTERM"), (turned_into_an_error, 130, "SIGINT")):
        with_run(monkeypatch, "pipeline", run)
        code, _, err = run_main(["pipeline"], capsys)
        assert code == status and "Traceback" not in err, err
        assert err.strip().startswith(f"askexpert: interrupted by {name}; run the same command again: finished stages")


def test_serve_keeps_its_own_signal_handling_and_every_other_command_exits_128_plus_the_signal(monkeypatch, capsys):
    """A server's SIGTERM drains and exits 0 (askexpert/commands/serve.py): main installs nothing for it. Every
    other command, `edge` included, stops on SIGTERM/SIGINT with one line and 143/130, no traceback."""
    assert on_interrupt("serve") is None
    seen = []
    with_run(monkeypatch, "serve", lambda argv: seen.append(signal.getsignal(signal.SIGTERM)))
    code, _, _ = run_main(["serve"], capsys)
    assert code == 0 and len(seen) == 1 and seen[0] is not askexpert.interrupts._raise_interrupted
    commands = ("fit", "validate", "test", "predict", "pipeline", "experts", "ablate", "adapt", "partition")
    for command in (*commands, "evaluate", "export", "route", "profile", "edge"):
        assert on_interrupt(command), command

    def interrupted(argv):
        raise KeyboardInterrupt  # Ctrl+C in the middle of `edge`'s requests

    with_run(monkeypatch, "edge", interrupted)
    code, _, err = run_main(["edge"], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == "askexpert: interrupted by SIGINT; " + on_interrupt("edge")


def test_what_counts_as_an_interruption():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    assert interruption(Interrupted(signal.SIGTERM)) == 15 and Interrupted(signal.SIGTERM).exit_status == 143
    assert interruption(SIGTERMException()) == 15  # Lightning's, where no handler of ours was installed
    assert interruption(KeyboardInterrupt()) == 2
    assert interruption(SystemExit(0)) is None and interruption(SystemExit(2)) is None
    assert interruption(ValueError("x")) is None


# -- the launcher of child fits ----------------------------------------------------------------------------------
def test_sigterm_to_a_launcher_stops_its_children_and_raises(tmp_path):
    from askexpert.pipeline.launcher import Job, launch_jobs

    before = signal.getsignal(signal.SIGTERM)
    pid_file = tmp_path / "child.pid"
    child = (
        f"import os, signal, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "os.kill(os.getppid(), signal.SIGTERM); time.sleep(120)"
    )
    started = time.monotonic()
    with pytest.raises(Interrupted) as raised:
        launch_jobs([Job("child", [sys.executable, "-c", child], str(tmp_path / "child.log"))], [None], 0.05)
    assert raised.value.signum == signal.SIGTERM and time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):  # stopped and reaped: nothing trains on unattended
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("exit_code, signum", [(143, 15), (130, 2), (-15, 15), (-2, 2), (1, None), (-9, None)])
def test_a_child_stopped_by_a_signal_stops_its_launcher_as_that_signal(tmp_path, exit_code, signum):
    """`experts` and `pipeline --parallel_experts` exit 143/130 too when the signal reached only their children."""
    from askexpert.pipeline.launcher import Job, run_jobs

    stop = f"import os, signal, sys; os.kill(os.getpid(), {-exit_code}) if {exit_code} < 0 else sys.exit({exit_code})"
    jobs = [Job("expert 0", [sys.executable, "-c", stop], str(tmp_path / "0.log"))]
    with pytest.raises(Interrupted if signum else UserError) as raised:
        run_jobs(jobs, [], poll_seconds=0.05)
    assert getattr(raised.value, "signum", None) == signum


# -- the pipeline's record --------------------------------------------------------------------------------------
def test_an_interrupted_stage_is_recorded_and_named_by_the_commands_that_read_the_run(tmp_path):
    from askexpert.pipeline.runner import _recorded_if_interrupted

    layout = RunLayout(str(tmp_path))
    record = {"base": {"done": True, "identity": "a"}, "experts/x/0": {"done": False, "identity": "b"}}
    prepared = SimpleNamespace(layout=layout, record=record)
    stages = [SimpleNamespace(name="base"), SimpleNamespace(name="experts/x/0")]
    with pytest.raises(Interrupted), _recorded_if_interrupted(prepared, stages):
        raise Interrupted(signal.SIGINT)
    saved = json.loads((tmp_path / "stages.json").read_text())
    assert saved["experts/x/0"] == {"done": False, "identity": "b", "interrupted": "SIGINT"}
    assert "interrupted" not in saved["base"]  # finished before the signal
    with pytest.raises(UserError, match=r"stage experts/x/0 of .* was interrupted \(SIGINT\); rerun the pipeline"):
        check_finished(layout)
    with pytest.raises(ValueError), _recorded_if_interrupted(prepared, stages):  # any other error records nothing
        raise ValueError("x")


@pytest.mark.slow  # ~45 s: a tiny pipeline in a subprocess, then its resume
def test_sigterm_inside_an_expert_stops_the_pipeline_with_143_and_a_rerun_resumes_it(tmp_path, capsys):
    config = write_configs(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["partition"] = {"method": "explicit", "experts": [list(range(10))], "allow_uncovered": True}
    raw["experts"]["config"].append(str(signal_config(tmp_path)))
    raw["experts"]["overrides"]["trainer.max_epochs"] = 2
    raw["static_baseline"] = False
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    command = ["pipeline", "--config", str(config), "--out", str(out)]
    done = signalled(command, tmp_path)
    assert done.returncode == 143, done.stderr[-3000:]
    assert our_lines(done.stderr) == [
        "askexpert: interrupted by SIGTERM; run the same command again: finished stages are skipped, the "
        "interrupted one resumes (last.ckpt)"
    ]
    record = json.loads((out / "stages.json").read_text())
    assert record["base"]["done"] and record["experts/progressive/0"]["interrupted"] == "SIGTERM"
    assert not record["experts/progressive/0"]["done"] and not (out / "report.json").exists()
    code, _, err = run_main(["evaluate", "--run", str(out)], capsys)
    assert code == 2 and "stage experts/progressive/0 of" in err and "was interrupted (SIGTERM)" in err
    # the same command: the expert resumes from its last.ckpt, the run finishes with its report
    code, stdout, err = run_main(command, capsys)
    assert code == 0, err
    assert "experts/progressive/0: resuming from its last checkpoint" in stdout
    record = json.loads((out / "stages.json").read_text())
    assert record["experts/progressive/0"]["done"] and record["experts/progressive/0"]["resumed"]
    assert "interrupted" not in record["experts/progressive/0"] and (out / "report.json").exists()
    assert not temporaries(out)


# -- export ---------------------------------------------------------------------------------------------------------
def test_an_export_removes_the_partial_folders_that_killed_exports_left(tmp_path):
    out = tmp_path / "system"
    dead, alive = dead_pid(), os.getppid()
    left = tmp_path / f".system.partial-{dead}"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "generalist.onnx").write_bytes(b"x")
    kept = [
        tmp_path / f".system.partial-{alive}",  # an export still running
        tmp_path / f".other.partial-{dead}",  # another export's
        tmp_path / ".system.partial-abc",  # not our pattern
        tmp_path / "system.partial-1",
    ]
    for folder in kept:
        folder.mkdir()
    (tmp_path / f".system.partial-{dead}0").write_text("a file, not a folder")  # not a folder of ours: kept
    staging = staging_folder(str(out))
    assert staging == str(tmp_path / f".system.partial-{os.getpid()}") and os.listdir(staging) == []
    assert not left.exists() and all(folder.is_dir() for folder in kept)


def test_sigterm_during_an_export_exits_143_and_leaves_nothing(tiny_pipeline_run, tmp_path, monkeypatch, capsys):
    import askexpert.commands.export as export

    _, run = tiny_pipeline_run
    left = tmp_path / f".system.partial-{dead_pid()}"
    left.mkdir()
    monkeypatch.setattr(export, "_export_all", lambda *args: signal_self("SIGTERM")(None))
    code, _, err = run_main(["export", "--run", str(run), "--out", str(tmp_path / "system")], capsys)
    assert code == 143 and err.strip() == "askexpert: interrupted by SIGTERM; run the same command again"
    assert list(tmp_path.iterdir()) == []  # neither its own partial folder nor the one a killed export left


def test_stop_on_signals_does_nothing_outside_the_main_thread():
    import threading

    seen = []

    def probe():
        with stop_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]

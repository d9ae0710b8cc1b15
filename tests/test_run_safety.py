"""Run folders survive crashes and second writers: atomic writes, locks, artefact checks and exact resumes.

Two tiny runs are shared by the module: a generalist `fit` (Mixup + CutMix + drop-path) and a pipeline whose
progressive experts train two epochs. Each is run uninterrupted in this process and, the second time, SIGKILLed
mid-epoch in a subprocess and resumed; the resumed run must end bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HELPERS, REPO, TINY_ARGS, run_subprocess_env
from helpers.cli import run_main
from helpers.locks import HOLD, TAKE, hold
from helpers.pipelines import write_configs

from askexpert.cli import cli_main
from askexpert.errors import UserError
from askexpert.files.atomic import TEMPORARY, atomic_path, atomic_write_text
from askexpert.files.checkpoints import load_checkpoint
from askexpert.runs.lock import LEASE_FILE, LOCK_FILE, LOCKED_ENV, PART_OF_ENV, locked

if str(HELPERS) not in sys.path:  # the killer callbacks, named by configs that also run in this process
    sys.path.insert(0, str(HELPERS))

GENERALIST = [
    *TINY_ARGS,
    "--model.mixup_alpha=0.8",
    "--model.cutmix_alpha=1.0",
    "--model.drop_path_rate=0.2",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=4",
]


def killer(folder: Path, batch: int) -> Path:
    """A config whose callback SIGKILLs the run before batch `batch` of its second epoch (killer.KillAtBatch)."""
    path = folder / "killer.yaml"
    callback = {"class_path": "killer.KillAtBatch", "init_args": {"epoch": 1, "batch": batch}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return path


def killed(command: list[str], tmp_path: Path) -> None:
    """Run `python -m askexpert ...` in a subprocess that SIGKILLs itself once (killer.KillAtBatch)."""
    env = {**run_subprocess_env(), "KILL_ONCE_MARKER": str(tmp_path / "killed")}
    done = subprocess.run([sys.executable, "-m", "askexpert", *command], env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(str(path))["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if TEMPORARY.search(p.name)]


# -- shared runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generalist(tmp_path_factory) -> tuple[Path, Path]:
    """(uninterrupted run, run SIGKILLed in epoch 1 and resumed with --ckpt_path last)."""
    folder = tmp_path_factory.mktemp("generalist")
    args = ["fit", *GENERALIST, "--config", str(killer(folder, batch=2))]
    whole, resumed = folder / "whole", folder / "resumed"
    cli_main([*args, "--trainer.default_root_dir", str(whole)])
    killed([*args, "--trainer.default_root_dir", str(resumed)], folder)
    assert load_checkpoint(str(resumed / "checkpoints" / "last.ckpt"))["epoch"] == 0
    assert {row["epoch"] for row in rows(resumed / "metrics.csv")} == {"0", "1"}  # epoch 1 had logged rows
    cli_main([*args, "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last"])
    return whole, resumed


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(pipeline config, uninterrupted run, run SIGKILLed inside its first progressive expert and resumed)."""
    folder = tmp_path_factory.mktemp("pipelines")
    config = write_configs(folder)
    raw = yaml.safe_load(config.read_text())
    for stage in ("generalist", "base"):
        raw[stage]["overrides"] = {"trainer.limit_train_batches": 3}
    # one progressive expert (of 10 classes), trained 2 epochs of 3 batches; no static baseline
    raw["partition"] = {"method": "explicit", "experts": [list(range(10))], "allow_uncovered": True}
    raw["experts"]["config"].append(str(killer(folder, batch=1)))
    raw["experts"]["overrides"]["trainer.max_epochs"] = 2
    raw["static_baseline"] = False
    config.write_text(yaml.safe_dump(raw))
    whole, resumed = folder / "whole", folder / "resumed"
    cli_main(["pipeline", "--config", str(config), "--out", str(whole)])
    killed(["pipeline", "--config", str(config), "--out", str(resumed)], folder)
    record = json.loads((resumed / "stages.json").read_text())
    assert record["base"]["done"] and not record["experts/progressive/0"]["done"]
    cli_main(["pipeline", "--config", str(config), "--out", str(resumed)])
    return config, whole, resumed


# -- exact resume ---------------------------------------------------------------------------------------------
def test_a_killed_fit_resumes_bit_identical(generalist):
    """Mixup/CutMix (numpy), drop-path and crop/flip (torch) and the shuffling all continue their streams."""
    whole, resumed = generalist
    for name in ("last.ckpt", "best.ckpt"):
        assert_same_weights(whole / "checkpoints" / name, resumed / "checkpoints" / name)
    # the rows the killed run logged in epoch 1 were replaced by the resumed epoch's: the same file as uninterrupted
    assert rows(whole / "metrics.csv") == rows(resumed / "metrics.csv")
    assert not temporaries(resumed)


def test_a_pipeline_killed_inside_an_expert_resumes_bit_identical(pipelines):
    """A progressive expert (its own sampler, the global generators) resumed mid-pipeline: same models, same report."""
    _, whole, resumed = pipelines
    for stage in ("generalist", "base", "experts/progressive/0"):
        assert_same_weights(whole / stage / "checkpoints" / "best.ckpt", resumed / stage / "checkpoints" / "best.ckpt")
    assert rows(whole / "experts/progressive/0/metrics.csv") == rows(resumed / "experts/progressive/0/metrics.csv")
    report, again = (json.loads((run / "report.json").read_text()) for run in (whole, resumed))
    for run in (report, again):
        run.pop("provenance")  # the run's folder and when it ran
    assert report == again
    assert not temporaries(resumed)


@pytest.mark.slow  # DataLoader worker processes: about 30 s more than the default test above
def test_a_killed_fit_with_loader_workers_resumes_bit_identical(tmp_path):
    """Workers draw their base seed from the global generator whenever a loader starts an epoch; the loaders are
    not persistent, so a resumed run draws it exactly where the uninterrupted one did."""
    args = ["fit", *GENERALIST, "--data.num_workers=1", "--config", str(killer(tmp_path, batch=2))]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cli_main([*args, "--trainer.default_root_dir", str(whole)])
    killed([*args, "--trainer.default_root_dir", str(resumed)], tmp_path)
    cli_main([*args, "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last"])
    assert_same_weights(whole / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")
    assert rows(whole / "metrics.csv") == rows(resumed / "metrics.csv")


# -- damaged artefacts ----------------------------------------------------------------------------------------
def test_a_corrupt_last_checkpoint_restarts_the_fit(generalist, tmp_path, capsys):
    _, resumed = generalist
    run = tmp_path / "run"
    shutil.copytree(resumed, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a full disk left before atomic writes
    args = ["fit", *GENERALIST, "--trainer.max_epochs=1", "--trainer.default_root_dir", str(run), "--ckpt_path", "last"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert f"checkpoint {last} is truncated" in err and "not resuming from it, training starts again" in err
    assert load_checkpoint(str(last))["epoch"] == 0  # a new run, not an error and not a resume
    assert [row["epoch"] for row in rows(run / "metrics.csv") if row.get("val/acc")] == ["0"]


def test_damaged_artefacts_of_finished_stages_are_rebuilt(pipelines, tmp_path, capsys):
    """A truncated best.ckpt or partition.json of a finished stage is not trusted, and a corrupt last.ckpt of an
    unfinished one restarts it: each with a line saying so."""
    config, whole, _ = pipelines
    out = tmp_path / "run"
    shutil.copytree(whole, out, symlinks=True)
    best = out / "generalist" / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[:1000])
    (out / "partition.json").write_text((out / "partition.json").read_text()[:50])
    record = json.loads((out / "stages.json").read_text())
    record["experts/progressive/0"]["done"] = False  # interrupted, and its last.ckpt is damaged
    (out / "stages.json").write_text(json.dumps(record))
    last = out / "experts/progressive/0/checkpoints/last.ckpt"
    last.write_bytes(b"not a checkpoint")
    code, out_text, err = run_main(["pipeline", "--config", str(config), "--out", str(out)], capsys)
    assert code == 0, err
    assert f"[1/4] generalist: checkpoint {best} is truncated" in out_text and "; training it again" in out_text
    assert "[2/4] base: done, config unchanged, skipped" in out_text
    assert "[3/4] partition: " in out_text and "is not a partition file" in out_text and "building it again" in out_text
    assert f"[4/4] experts/progressive/0: checkpoint {last} is truncated" in out_text
    assert "training the stage again from the start" in out_text
    assert_same_weights(whole / "generalist/checkpoints/best.ckpt", best)  # retrained: the same seed, the same model
    assert (out / "partition.json").read_text() == (whole / "partition.json").read_text()
    assert all(entry["done"] for entry in json.loads((out / "stages.json").read_text()).values())


def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        code, _, err = run_main(["fit", *TINY_ARGS, "--trainer.default_root_dir", str(run)], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"askexpert: error: {run} is in use by pid {holder.pid} (`python -c ")
        assert "started" in lines[0] and "wait for it to finish or stop it" in lines[0]
        assert sorted(os.listdir(run)) == [LEASE_FILE, LOCK_FILE]  # the refused fit wrote nothing
        # writing inside a held folder is refused too (a `fit` into a running pipeline's stage folder)
        with pytest.raises(UserError, match=f"run/generalist is part of .*run, which is in use by pid {holder.pid}"):
            with locked(str(run / "generalist")):
                pass
    finally:
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait()
    with locked(str(run)):  # the kernel dropped the dead holder's lock: nothing blocks the next writer
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_covers_the_processes_its_holder_starts(tmp_path):
    out = tmp_path / "out"
    with locked(str(out)):
        # a child (a side-by-side expert, a DDP rank) writes its own folder inside the held one
        child = subprocess.run([sys.executable, "-c", TAKE, str(out / "experts" / "0")], capture_output=True, text=True)
        assert child.returncode == 0, child.stderr
        # any other process is refused
        env = {key: value for key, value in os.environ.items() if key != LOCKED_ENV}
        other = subprocess.run(
            [sys.executable, "-c", TAKE, str(out / "experts" / "0")], capture_output=True, text=True, env=env
        )
        assert other.returncode == 1 and f"in use by pid {os.getpid()}" in other.stderr
    assert LOCKED_ENV not in os.environ


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(str(target), "old\n")
    with pytest.raises(OSError), atomic_path(str(target)) as tmp:
        Path(tmp).write_text("half a fi")
        raise OSError(28, "No space left on device")  # the disk filled up mid-write
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["report.json"]
    # what a SIGKILLed writer leaves behind is removed by the next process that locks the folder
    (tmp_path / "checkpoints").mkdir()
    dead = next(pid for pid in range(4242, 4_194_304) if not os.path.exists(f"/proc/{pid}"))  # no such process
    stale = tmp_path / "checkpoints" / f".last.ckpt.{dead}.0123abcd.tmp"
    stale.write_bytes(b"x")
    with locked(str(tmp_path)):
        assert not stale.exists() and (tmp_path / "report.json").exists()


def test_a_folder_is_not_taken_while_a_writer_works_inside_it(tmp_path):
    """`fit --trainer.default_root_dir runs` (or an ablation) while a pipeline writes runs/x: refused, and the
    running writer's temporary files are not cleaned away from under it."""
    inner = tmp_path / "runs" / "x"
    holder = hold(inner)
    try:
        live = inner / "checkpoints" / f".last.ckpt.{holder.pid}.0123abcd.tmp"  # a write in progress
        live.parent.mkdir()
        live.write_bytes(b"half")
        with pytest.raises(UserError, match=f"runs contains .*runs/x, which is in use by pid {holder.pid}"):
            with locked(str(tmp_path / "runs")):
                pass
        assert live.exists()
    finally:
        holder.kill()
        holder.wait()
    with locked(str(tmp_path / "runs")):  # the writer is gone: its folder may be taken and its leftovers go
        assert not live.exists()


@pytest.mark.parametrize("part_of", [None, ["another"], ["out", "out/store"]])
def test_a_driver_started_again_is_not_refused_by_its_running_jobs(tmp_path, part_of):
    """A `--launcher submitit` job is no child of its driver: it says in ASKEXPERT_PART_OF which folders the
    driver holds. A driver started again on them takes them while the job runs, and cleans none of the job's
    temporary files away from under it; a writer that says nothing (or names other folders) still refuses it."""
    root = Path(os.path.realpath(tmp_path))
    out, claim = root / "out", root / "out" / "store" / "claims" / "base-1"
    env = {key: value for key, value in os.environ.items() if key not in (LOCKED_ENV, PART_OF_ENV)}
    if part_of is not None:
        env[PART_OF_ENV] = json.dumps([str(root / folder) for folder in part_of])
    job = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(claim)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        assert job.stdout.readline().strip() == "held"
        # a write in progress, and one whose name names no writer (mkstemp's)
        temporaries = [claim / f".x.{job.pid}.0123abcd.tmp", claim / ".tmp-k2j3h4"]
        for temporary in temporaries:
            temporary.write_text("half")
        if part_of != ["out", "out/store"]:
            with pytest.raises(UserError, match=f"out contains .*claims/base-1, which is in use by pid {job.pid}"):
                with locked(str(out)):
                    pass
        else:
            with locked(str(out)), locked(str(out / "store")):  # as a driver takes its --out and its store
                assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
            for record in (claim / LOCK_FILE, claim / LEASE_FILE):  # what the job's lock says of it
                assert json.loads(record.read_text())["part_of"] == [str(out), str(out / "store")]
        assert all(temporary.exists() for temporary in temporaries)
    finally:
        job.kill()
        job.wait()


def test_an_exported_lock_variable_lets_no_second_writer_in(tmp_path, monkeypatch):
    """Only a lock held by this process or one that started it is inherited, not one named in a stale variable."""
    run = tmp_path / "run"
    holder = hold(run)
    try:
        monkeypatch.setenv(LOCKED_ENV, json.dumps([[str(run), holder.pid]]))  # the holder is no ancestor of ours
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            with locked(str(run)):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_while_saving_a_checkpoint_names_the_file(tmp_path, monkeypatch):
    import askexpert.files.checkpoints as checkpoints
    from askexpert.errors import os_error_message
    from askexpert.files.checkpoints import save_torch_file

    target = tmp_path / "best.ckpt"
    save_torch_file({"w": torch.ones(3)}, str(target))
    before = target.read_bytes()

    class FullDisk:
        def __init__(self, path, mode):
            self.handle = open(path, mode)  # noqa: SIM115 - closed in __exit__

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(checkpoints, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as raised:
        save_torch_file({"w": torch.zeros(1000)}, str(target))
    assert raised.value.filename == str(target)
    assert (
        os_error_message(raised.value)
        == f"cannot write {target}: No space left on device (free some space and run again)"
    )
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["best.ckpt"]

"""askexpert/loggers.py: RunCSVLogger keeps one metrics.csv per run folder, continued by a resumed run and never
left half-written (driven directly, the way Lightning's logger connector calls it, without a Trainer)."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import pytest
import yaml

from askexpert.loggers import RunCSVLogger


def log(logger: RunCSVLogger, *rows: dict) -> None:
    """Log `rows` (each with its `step`) and save them, as Lightning does after a logging step."""
    for row in rows:
        values = {key: value for key, value in row.items() if key != "step"}
        logger.log_metrics(values, step=row["step"])
    logger.save()


def read(folder: Path) -> tuple[list[str], list[dict]]:
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
        handle.seek(0)
        header = next(csv.reader(handle))
    return header, rows


def epochs(rows: list[dict]) -> list[str]:
    return [row["epoch"] for row in rows]


def test_metrics_go_straight_into_the_run_folder(tmp_path) -> None:
    logger = RunCSVLogger(save_dir=str(tmp_path))
    assert os.path.normpath(logger.log_dir) == str(tmp_path)  # no lightning_logs/version_0 below the run folder
    log(logger, {"step": 0, "epoch": 0, "train_loss": 2.5}, {"step": 1, "epoch": 0, "train_loss": 2.0})
    header, rows = read(tmp_path)
    assert header == ["epoch", "step", "train_loss"]  # sorted, as Lightning's writer orders them
    assert [(r["step"], r["train_loss"]) for r in rows] == [("0", "2.5"), ("1", "2.0")]
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]  # no temporary file left


def test_a_new_launch_appends_and_keeps_the_earlier_columns(tmp_path) -> None:
    log(RunCSVLogger(save_dir=str(tmp_path)), {"step": 0, "epoch": 0, "train_loss": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "directory exists and is not empty" is not raised
        resumed = RunCSVLogger(save_dir=str(tmp_path), append=True)
        log(resumed, {"step": 1, "epoch": 1, "train_loss": 1.5})
    header, rows = read(tmp_path)
    assert header == ["epoch", "step", "train_loss"]
    assert epochs(rows) == ["0", "1"] and [r["train_loss"] for r in rows] == ["2.0", "1.5"]

    # a column the earlier launch never logged: one rewrite with the union of both headers, no row lost
    log(resumed, {"step": 2, "epoch": 1, "val_acc": 0.5})
    header, rows = read(tmp_path)
    assert header == ["epoch", "step", "train_loss", "val_acc"]
    assert [(r["step"], r["train_loss"], r["val_acc"]) for r in rows] == [
        ("0", "2.0", ""),
        ("1", "1.5", ""),
        ("2", "", "0.5"),
    ]


def test_append_false_starts_a_fresh_file(tmp_path) -> None:
    log(RunCSVLogger(save_dir=str(tmp_path)), {"step": 0, "epoch": 0, "old": 1.0})
    fresh = RunCSVLogger(save_dir=str(tmp_path), append=False)
    assert fresh.experiment is not None  # the writer is made when first used: that is when the old file goes
    assert not (tmp_path / "metrics.csv").exists()
    log(fresh, {"step": 0, "epoch": 0, "new": 2.0})
    header, rows = read(tmp_path)
    assert header == ["epoch", "new", "step"] and len(rows) == 1


def test_rows_are_appended_in_place_and_rewrites_replace_the_file(tmp_path) -> None:
    """Between rewrites (atomic: a new file renamed over the old one) rows are appended to the same file."""
    logger = RunCSVLogger(save_dir=str(tmp_path))
    log(logger, {"step": 0, "epoch": 0, "loss": 1.0})
    first = os.stat(tmp_path / "metrics.csv").st_ino
    log(logger, {"step": 1, "epoch": 0, "loss": 0.9})
    assert os.stat(tmp_path / "metrics.csv").st_ino == first
    log(logger, {"step": 2, "epoch": 0, "acc": 0.1})  # a new column
    assert os.stat(tmp_path / "metrics.csv").st_ino != first
    assert len(read(tmp_path)[1]) == 3


def test_a_resumed_fit_drops_the_rows_of_the_epochs_it_trains_again(tmp_path) -> None:
    """A killed run logged epochs 0-2 but its last checkpoint is from the end of epoch 0: the resumed run
    trains epoch 1 again, so the file must end as an uninterrupted run's would (epochs 0, 1, 2 once each)."""
    killed = RunCSVLogger(save_dir=str(tmp_path))
    log(killed, *({"step": step, "epoch": step // 2, "loss": 10.0 - step} for step in range(6)))
    resumed = RunCSVLogger(save_dir=str(tmp_path), append=True)
    resumed.resuming = True
    log(resumed, {"step": 2, "epoch": 1, "loss": 7.5}, {"step": 3, "epoch": 1, "loss": 7.0})
    assert epochs(read(tmp_path)[1]) == ["0", "0", "1", "1"]
    assert [r["loss"] for r in read(tmp_path)[1]] == ["10.0", "9.0", "7.5", "7.0"]
    log(resumed, {"step": 4, "epoch": 2, "loss": 6.0})  # only the first save drops rows
    assert epochs(read(tmp_path)[1]) == ["0", "0", "1", "1", "2"]


def test_a_resumed_fit_keeps_rows_without_an_epoch(tmp_path) -> None:
    log(RunCSVLogger(save_dir=str(tmp_path)), {"step": 0, "epoch": 0, "loss": 1.0}, {"step": 1, "test_acc": 0.4})
    resumed = RunCSVLogger(save_dir=str(tmp_path))
    resumed.resuming = True
    log(resumed, {"step": 1, "epoch": 0, "loss": 0.5})
    rows = read(tmp_path)[1]
    assert [(r["epoch"], r["test_acc"], r["loss"]) for r in rows] == [("", "0.4", ""), ("0", "", "0.5")]


def test_a_torn_last_row_is_dropped_by_the_next_launch(tmp_path) -> None:
    log(RunCSVLogger(save_dir=str(tmp_path)), {"step": 0, "epoch": 0, "loss": 1.0}, {"step": 1, "epoch": 0, "loss": 2})
    text = (tmp_path / "metrics.csv").read_text()
    (tmp_path / "metrics.csv").write_text(text[: text.rfind("\n", 0, len(text) - 1) + 4])  # a crash mid-append
    log(RunCSVLogger(save_dir=str(tmp_path)), {"step": 2, "epoch": 1, "loss": 0.5})
    rows = read(tmp_path)[1]
    assert [r["step"] for r in rows] == ["0", "2"]
    assert (tmp_path / "metrics.csv").read_text().endswith("\n")


def test_hyperparameters_are_written_into_the_run_folder(tmp_path) -> None:
    logger = RunCSVLogger(save_dir=str(tmp_path))
    logger.log_hyperparams({"lr": 0.001, "model_name": "vit_micro_patch8_32"})
    logger.log_hyperparams({"seed": 3})  # merged into the same file
    saved = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert saved == {"lr": 0.001, "model_name": "vit_micro_patch8_32", "seed": 3}
    assert sorted(os.listdir(tmp_path)) == ["hparams.yaml"]


def test_checkpoint_writes_fsync_the_appended_rows(tmp_path, monkeypatch) -> None:
    logger = RunCSVLogger(save_dir=str(tmp_path))
    log(logger, {"step": 0, "epoch": 0, "loss": 1.0})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    logger.after_save_checkpoint(checkpoint_callback=None)
    assert synced == [os.stat(tmp_path / "metrics.csv").st_ino]


@pytest.mark.parametrize("value, expected", [("3", 3), ("2.0", 2), ("", None)])
def test_epochs_are_read_back_from_the_text_of_the_file(tmp_path, value, expected) -> None:
    """The file stores `2.0` for an epoch logged as a float; the resume still recognises it as epoch 2."""
    (tmp_path / "metrics.csv").write_text(f"epoch,step\n{value},0\n")
    resumed = RunCSVLogger(save_dir=str(tmp_path))
    resumed.resuming = True
    log(resumed, {"step": 1, "epoch": 3})
    kept = [r["epoch"] for r in read(tmp_path)[1]][:-1]
    assert kept == ([] if expected is not None and expected >= 3 else [value])

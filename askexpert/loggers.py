"""A CSV logger that appends to its run folder's `metrics.csv` when a run is resumed, and never leaves the file
half-written.

Lightning's CSVLogger starts every launch with an empty column list and, on the first new column,
rewrites `metrics.csv` with only the columns it has seen in *this* launch, losing the earlier epochs of a
resumed run. This writer starts from the existing header instead, so a resumed run's metrics continue in
the same file.

How the file is written (see askexpert/files/atomic.py for the project's rule):
- a new file and every rewrite (a new column, a repair) go through a temporary file, fsync and rename;
- rows are appended in between (Lightning saves after every logging step: rewriting the file each time would
  cost a copy of it per step). An append cut short by a crash leaves at most a torn last row, and the file is
  fsynced after every checkpoint write, so the rows of every checkpointed epoch are on disk.
- a resumed `fit` starts with one atomic rewrite that drops a torn last row and the rows of the epochs it is
  about to train again (those the killed run logged after its last checkpoint). The file then holds exactly
  the rows an uninterrupted run writes, and no reader ever meets a broken row except the last one of a file
  that is being appended to at that moment. `hparams.yaml` is written atomically.
"""

from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from askexpert.files.atomic import atomic_path, atomic_write_text, naming_errors


def _epoch(row: dict) -> int | None:
    value = row.get("epoch")
    return None if value in (None, "") else int(float(value))


class _AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, append: bool, logger: RunCSVLogger) -> None:
        super().__init__(log_dir)
        self._logger = logger
        self._checked = False  # the existing file was read (and repaired) once
        if not append and os.path.isfile(self.metrics_file_path):
            os.remove(self.metrics_file_path)  # a fresh run in an old folder starts a fresh file
        elif os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _check_log_dir_exists(self) -> None:
        """Appending to an existing run folder is the point; no warning about it."""

    def log_hparams(self, params: dict) -> None:
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        rows: list[dict] | None = None  # the file's rows when it is rewritten; None: the new rows are appended
        if not os.path.isfile(self.metrics_file_path):
            rows = []
        elif new_keys or not self._checked:
            found, torn = self._existing_rows()
            kept = found
            if not self._checked and self._logger.resuming:
                # the rows of the epochs this run trains again (a killed run logged them after its checkpoint)
                epochs = [_epoch(row) for row in self.metrics if _epoch(row) is not None]
                if epochs:
                    kept = [row for row in found if _epoch(row) is None or _epoch(row) < min(epochs)]
            if new_keys or torn or len(kept) != len(found):
                rows = kept
        self._checked = True
        if rows is None:
            with naming_errors(self.metrics_file_path), open(self.metrics_file_path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.metrics_keys).writerows(self.metrics)
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows + self.metrics)
            atomic_write_text(self.metrics_file_path, buffer.getvalue())
        self.metrics = []

    def _existing_rows(self) -> tuple[list[dict], bool]:
        """The file's complete rows, and whether its last row was torn (no line end: a crash cut an append)."""
        with open(self.metrics_file_path, newline="") as handle:
            text = handle.read()
        torn = bool(text) and not text.endswith("\n")
        if torn:
            text = text[: text.rfind("\n") + 1]
        return list(csv.DictReader(io.StringIO(text, newline=""))), torn

    def sync(self) -> None:
        """fsync the appended rows (called after every checkpoint write)."""
        if os.path.isfile(self.metrics_file_path):
            fd = os.open(self.metrics_file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class RunCSVLogger(CSVLogger):
    """`CSVLogger` writing `metrics.csv` and `hparams.yaml` straight into the run folder, resumable.

    Args:
        save_dir: the run folder (the CLI fills in `--trainer.default_root_dir`).
        append: continue an existing `metrics.csv` (the CLI sets it when `fit` resumes from a checkpoint);
            otherwise a fresh run replaces it.
    """

    def __init__(self, save_dir: str = ".", append: bool = True, flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.append = append
        # set by the CLI for `fit --ckpt_path ...`: the first save drops the rows of the epochs trained again
        self.resuming = False

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir, append=self.append, logger=self)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if self._experiment is not None:
            self._experiment.sync()

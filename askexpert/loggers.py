"""A CSV logger that appends to its run folder's `metrics.csv` when a run is resumed.

Lightning's CSVLogger starts every launch with an empty column list and, on the first new column,
rewrites `metrics.csv` with only the columns it has seen in *this* launch, losing the earlier epochs of a
resumed run. This writer starts from the existing header instead, so a resumed run's metrics continue in
the same file.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, append: bool) -> None:
        super().__init__(log_dir)
        if not append and self._fs.isfile(self.metrics_file_path):
            self._fs.rm(self.metrics_file_path)  # a fresh run in an old folder starts a fresh file
        elif self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _check_log_dir_exists(self) -> None:
        """Appending to an existing run folder is the point; no warning about it."""


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

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir, append=self.append)
        return self._experiment

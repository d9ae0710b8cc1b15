"""Callbacks that the CLI always installs."""

from __future__ import annotations

import csv
import io
import os
import tempfile

import torch
from lightning.pytorch.callbacks import BasePredictionWriter


def atomic_write_text(path: str, text: str) -> None:
    """Write `path` through a temporary file and a rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class PredictionCSVWriter(BasePredictionWriter):
    """Writes `predict` results as CSV: index, prediction, confidence, class name (and label when known).

    Args:
        output: CSV path; default `<trainer.default_root_dir>/predictions.csv`.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            return
        if isinstance(predictions[0], list):  # several predict dataloaders: take them in order
            predictions = [batch for loader in predictions for batch in loader]
        columns = {
            key: torch.cat([batch[key] for batch in predictions]).cpu() for key in predictions[0] if key != "probs"
        }
        names = getattr(trainer.datamodule, "class_names", None)
        rows = [["index", *columns, *(["class_name"] if names else [])]]
        for i in range(len(columns["prediction"])):
            row = [i, *(round(float(v[i]), 6) if v.is_floating_point() else int(v[i]) for v in columns.values())]
            rows.append(row + ([names[int(columns["prediction"][i])]] if names else []))
        path = self.output or os.path.join(trainer.default_root_dir, "predictions.csv")
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        print(f"wrote {len(rows) - 1} predictions to {path}")

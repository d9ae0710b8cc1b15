"""Training-time callbacks that the CLI installs: the prediction writer and the config saver (here), the
non-finite guard (guard.py), the random-state checkpoint (rng.py) and the sync-free progress bar (progress.py).
`askexpert.callbacks.PredictionCSVWriter` is a class path users name in configs."""

from __future__ import annotations

import csv
import io
import os

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import SaveConfigCallback

from askexpert.files.atomic import atomic_path, atomic_write_text
from askexpert.runs.folder import evaluation_dir


class PredictionCSVWriter(BasePredictionWriter):
    """Writes `predict` results as CSV: index, prediction, confidence, class name (and label when known).

    Args:
        output: CSV path; default `<trainer.default_root_dir>/eval/predictions.csv`.
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
        path = self.output or os.path.join(evaluation_dir(trainer.default_root_dir), "predictions.csv")
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        print(f"wrote {len(rows) - 1} predictions to {path}")


class _AtomicSaving:
    """A parser whose single-file `save` writes through a temporary file, fsync and rename (everything else is
    the parser's own)."""

    def __init__(self, parser) -> None:
        self._parser = parser

    def __getattr__(self, name: str):
        if name == "_parser":  # an unpickled copy (ddp_spawn) asks before `_parser` is set: no endless recursion
            raise AttributeError(name)
        return getattr(self._parser, name)

    def save(self, namespace, path, *args, overwrite: bool = False, multifile: bool = True, **kwargs) -> None:
        if multifile:  # one file per included config: jsonargparse's own writes
            self._parser.save(namespace, path, *args, overwrite=overwrite, multifile=multifile, **kwargs)
            return
        if not overwrite and os.path.isfile(path):
            raise ValueError(f"Refusing to overwrite existing file: {path}")
        with atomic_path(os.fspath(path)) as tmp:
            self._parser.save(namespace, tmp, *args, overwrite=True, multifile=False, **kwargs)


class AtomicSaveConfigCallback(SaveConfigCallback):
    """Lightning's `config.yaml` writer, writing the file atomically (see askexpert/files/atomic.py)."""

    def __init__(self, parser, config, *args, **kwargs) -> None:
        super().__init__(_AtomicSaving(parser), config, *args, **kwargs)

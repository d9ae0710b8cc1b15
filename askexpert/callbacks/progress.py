"""A progress bar that never makes a training step wait for the GPU.

Lightning's `TQDMProgressBar` (refresh rate 1) reads the progress-bar metrics after every batch, and reading
a metric that lives on the GPU is `.item()`: the CPU stops until every queued kernel has run, so it can no
longer prepare the next step while the GPU computes this one. `RichProgressBar` does the same on every batch
whatever its refresh rate. `IntervalProgressBar` separates the two things a bar shows:

- the counter (batch n of N, speed) needs no GPU value: it is redrawn at most every `min_seconds`;
- metric values (`train/loss`, and the validation metrics Lightning keeps for the bar) are read only on the
  steps where the loggers write anyway (`log_every_n_steps`), where the host waits for the GPU once for
  everything, and at the end of every epoch and validation.

Modules log `train/loss` without `prog_bar=True` (Lightning would otherwise read it after every batch, bar
or no bar); this bar shows it from `trainer.callback_metrics`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

DEFAULT_KEYS = ("train/loss",)


class IntervalProgressBar(TQDMProgressBar):
    """TQDM bar: counters redrawn at most every `min_seconds`, metrics read at the logging interval.

    Args:
        keys: training metrics to show from `trainer.callback_metrics` (logged without `prog_bar`; askexpert's
            modules log `train/loss` on the logger's steps and on an epoch's first and last batches).
        min_seconds: shortest time between two redraws of a counter.
        process_position: as in `TQDMProgressBar`.
        leave: as in `TQDMProgressBar`.
    """

    def __init__(
        self,
        keys: Sequence[str] = DEFAULT_KEYS,
        min_seconds: float = 0.2,
        process_position: int = 0,
        leave: bool = False,
    ) -> None:
        super().__init__(refresh_rate=1, process_position=process_position, leave=leave)
        self.keys = tuple(keys)
        self.min_seconds = min_seconds
        self._last_draw = 0.0

    def _should_update(self, current: int, total: int) -> bool:
        """Counters of every bar (train, validation, test, predict): time-based, and always at the end."""
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.min_seconds:
            self._last_draw = now
            return True
        return False

    @staticmethod
    def reads_metrics_now(trainer: pl.Trainer) -> bool:
        """Whether metric values are read after this training batch: on the steps the loggers write (Lightning's
        own test, which its LearningRateMonitor uses too), where the host waits for the GPU anyway."""
        return trainer._logger_connector.should_update_logs

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self._train_progress_bar  # the property raises while there is none
        if bar is None or bar.disable:
            return
        n = batch_idx + 1
        if self.reads_metrics_now(trainer) or n == bar.total:
            self._draw(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        elif self._should_update(n, bar.total):
            self._draw(bar, n)

    def _draw(self, bar, n: int) -> None:
        bar.n = n
        bar.refresh()
        self._last_draw = time.monotonic()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        found = trainer.callback_metrics
        for key in self.keys:
            value = found.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                items[key] = value.item()  # the one host sync, on a logging step or at an epoch's end
        return items

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # End the bars' line: the one-line error that follows (e.g. a divergence) must start a line of its own.
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()
        if self.is_enabled:
            print(file=sys.stderr, flush=True)

"""A callback that kills its own process with SIGKILL, to test resuming a run that died mid-training."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtEpoch(Callback):
    """SIGKILL the process when epoch `epoch` starts (after the previous epochs saved their checkpoints)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillOnce(Callback):
    """SIGKILL the process when epoch `epoch` starts, the first time only (a marker file remembers it), so
    the same config can be run again to test resuming."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        marker = os.environ["KILL_ONCE_MARKER"]
        if trainer.current_epoch == self.epoch and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtBatch(Callback):
    """Send `signal` (SIGTERM, SIGINT: what a scheduler or Ctrl+C sends) to the process before batch `batch` of epoch
    `epoch`, once: only while the file `KILL_ONCE_MARKER` names does not exist (it is created), and never without the
    variable, so the same config runs uninterrupted the second time."""

    def __init__(self, epoch: int = 1, batch: int = 1, signal: str = "SIGTERM") -> None:
        self.epoch = epoch
        self.batch = batch
        self.signal = signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        marker = os.environ.get("KILL_ONCE_MARKER")
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or not marker or os.path.exists(marker):
            return
        open(marker, "w").close()
        os.kill(os.getpid(), getattr(signal, self.signal))


class KillAtBatch(Callback):
    """SIGKILL the process before batch `batch` of epoch `epoch` (mid-epoch: that epoch has logged rows), once:
    only while the file `KILL_ONCE_MARKER` names does not exist (it is created), and never without the variable,
    so the same config runs uninterrupted in the test process."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        marker = os.environ.get("KILL_ONCE_MARKER")
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or not marker or os.path.exists(marker):
            return
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

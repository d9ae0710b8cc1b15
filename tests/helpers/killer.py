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

"""Stop a run the moment training stops producing finite numbers, and never save what it produced.

A run that went NaN used to train on for epochs and hand its last good checkpoint to the next stage as if
nothing happened. `NonFiniteGuard` (installed by the CLI in every `fit`) makes that impossible:

- **Cheap.** Every training step adds one `isfinite` on the loss and on the total gradient norm, as
  tensors on the device. They are collected in a short window and read with one host sync every
  `min(log_every_n_steps, 10)` steps, so the GPU is never waited for on every step. The first bad step in
  the window is still reported exactly.
- **Never saves bad weights.** The window is also read at every epoch end and before validation, and the
  weights themselves are checked before every checkpoint is written (Lightning calls callbacks'
  `on_save_checkpoint` before the file is written). So `last.ckpt` and `best.ckpt` are always the last good
  state, and the error says where it is.
- **fp16's loss scaler is not divergence.** With `16-mixed`, Lightning's GradScaler skips steps whose
  gradients overflowed and lowers the scale: that is its job, so gradients are not checked. A non-finite loss
  is only divergence when it persists for `SCALER_PATIENCE` steps in a row (the weights no longer produce a
  finite forward pass, which no loss scale can fix).

The error is a `DivergenceError` (a `UserError`): one line naming the run, the step and epoch, the last good
checkpoint and what to try; `python -m askexpert` exits with status 3 for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from askexpert.errors import DivergenceError
from askexpert.files.checkpoints import all_finite

MAX_CHECK_INTERVAL = 10  # steps between two reads of the device-side flags, at most
SCALER_PATIENCE = 20  # consecutive non-finite losses under fp16's loss scaler that count as divergence


@dataclass
class _Step:
    step: int
    epoch: int
    batch: int
    loss_ok: torch.Tensor  # 0-d bool on the device
    grad_ok: torch.Tensor | None  # None when the gradient norm is not checked (fp16 scaler, no gradients)


def total_grad_norm(parameters) -> torch.Tensor | None:
    """The 2-norm of all gradients as a 0-d tensor on their device (no host sync); None without gradients.
    fp16 gradients (`16-true`) are summed in fp32: their norm can exceed fp16's range while every value is
    finite, and that must not look like divergence."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None and all(g.dtype != torch.float16 for g in grads):
        return get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


class NonFiniteGuard(Callback):
    """Stops `fit` with a `DivergenceError` at the first non-finite loss or gradient norm (see module doc).

    Args:
        log_grad_norm: also log the pre-clipping gradient norm as `train/grad_norm` (at the logging
            interval, like every step metric), which shows a run heading for trouble before it gets there.
    """

    def __init__(self, log_grad_norm: bool = True) -> None:
        super().__init__()
        self.log_grad_norm = log_grad_norm
        self._window: list[_Step] = []
        self._grad_ok: torch.Tensor | None = None
        self._bad_losses_in_a_row = 0

    # -- collecting, on the device -----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window, self._grad_ok, self._bad_losses_in_a_row = [], None, 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if _loss_scaler(trainer) is not None:  # fp16: the scaler skips overflowing steps on purpose
            return
        norm = total_grad_norm(p for group in optimizer.param_groups for p in group["params"])
        if norm is None:
            return
        self._grad_ok = torch.isfinite(norm)
        # only on the steps the loggers write: each `self.log` costs Python time on every step otherwise
        if self.log_grad_norm and trainer._logger_connector.should_update_logs:
            pl_module.log("train/grad_norm", norm.detach().float(), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):  # a skipped step (training_step returned None)
            self._grad_ok = None
            return
        finite = torch.isfinite(loss.detach())
        self._window.append(_Step(trainer.global_step, trainer.current_epoch, batch_idx, finite, self._grad_ok))
        self._grad_ok = None
        if len(self._window) >= check_interval(trainer):
            self._check(trainer, pl_module)

    # -- reading the flags: one sync per window -----------------------------------------------------------
    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window, self._window = self._window, []
        if not window:
            return
        true = window[0].loss_ok.new_ones(())
        flags = torch.stack([torch.stack([s.loss_ok, true if s.grad_ok is None else s.grad_ok]) for s in window])
        for step, (loss_ok, grad_ok) in zip(window, flags.tolist(), strict=True):
            if _loss_scaler(trainer) is not None:
                self._bad_losses_in_a_row = 0 if loss_ok else self._bad_losses_in_a_row + 1
                if self._bad_losses_in_a_row >= SCALER_PATIENCE:
                    what = f"non-finite loss for {SCALER_PATIENCE} steps in a row (fp16 loss scaling cannot fix it)"
                    self._fail(trainer, pl_module, step, what)
                continue
            if not loss_ok:
                self._fail(trainer, pl_module, step, "non-finite loss")
            if not grad_ok:
                self._fail(trainer, pl_module, step, "non-finite gradient norm")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)
        if not all_finite(pl_module.parameters()):
            self._fail(trainer, pl_module, None, "non-finite weights at the end of the epoch")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint saves here when validation runs mid-epoch or every few epochs, and a weights-only
        # save (best.ckpt) never calls `on_save_checkpoint`: check the weights it is about to write.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not all_finite(pl_module.parameters()):
            self._fail(trainer, pl_module, None, "non-finite weights after validation")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Lightning calls this while it builds a full checkpoint, before the file is written: raising here means
        # a checkpoint with non-finite weights never reaches the disk (AtomicCheckpointIO checks every write,
        # weights-only ones too, as a last line).
        self._check(trainer, pl_module)
        if not all_finite(checkpoint.get("state_dict", {}).values()):
            self._fail(trainer, pl_module, None, "non-finite weights when saving a checkpoint")

    # -- the one line --------------------------------------------------------------------------------------
    def _fail(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: _Step | None, what: str) -> None:
        epoch = step.epoch if step else trainer.current_epoch
        number = step.step if step else trainer.global_step
        where = f"at step {number} (epoch {epoch}" + (f", batch {step.batch})" if step else ")")
        model = type(pl_module).__name__
        name = getattr(pl_module, "hparams", {}).get("model_name")
        run = trainer.default_root_dir
        last_good, words = self._last_good(trainer)
        message = (
            f"training diverged in {run} ({model}{' ' + name if name else ''}): {what} {where}; "
            f"{words}; try {_advice(trainer, pl_module)}"
        )
        raise DivergenceError(message, step=number, epoch=epoch, last_good=last_good)

    def _last_good(self, trainer: pl.Trainer) -> tuple[str | None, str]:
        """The newest checkpoint this run wrote (every write was checked, so it is good), or the one it resumed
        from, as (path, words for the error line)."""
        written = [
            cb.best_model_path
            for cb in trainer.checkpoint_callbacks
            if getattr(cb, "best_model_path", "") and os.path.isfile(cb.best_model_path)
        ]
        if written:
            path = max(written, key=os.path.getmtime)
            try:  # on the way out only: reading the file's progress counters costs nothing that matters now
                saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                return path, f"last good checkpoint: {path} (epoch {saved['epoch']}, step {saved['global_step']})"
            except Exception:  # noqa: BLE001 - the path is still the answer
                return path, f"last good checkpoint: {path}"
        resumed_from = trainer.ckpt_path
        if resumed_from and os.path.isfile(resumed_from):
            return resumed_from, f"last good checkpoint: {resumed_from} (the one this run resumed from)"
        return None, "no checkpoint was written before it diverged"


def check_interval(trainer: pl.Trainer) -> int:
    """Steps between two reads of the flags: the logging interval, and never more than 10."""
    return max(1, min(MAX_CHECK_INTERVAL, int(trainer.log_every_n_steps or 1)))


def _loss_scaler(trainer: pl.Trainer):
    return getattr(trainer.precision_plugin, "scaler", None)


def _advice(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
    """What usually cures it, with the run's current values."""
    h = getattr(pl_module, "hparams", {})
    tips = []
    if "lr" in h:
        tips.append(f"a lower learning rate (--model.lr, now {h['lr']:g})")
    if "warmup_epochs" in h:
        tips.append(f"a longer warm-up (--model.warmup_epochs, now {h['warmup_epochs']:g})")
    clip = trainer.gradient_clip_val
    if clip:
        tips.append(f"stronger gradient clipping (--trainer.gradient_clip_val, now {clip:g})")
    else:
        tips.append("gradient clipping (--trainer.gradient_clip_val 1.0)")
    return ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]

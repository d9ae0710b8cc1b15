"""The non-finite guard: a diverging run stops at once with one clear line and never saves bad weights."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers.cli import run_main
from lightning.pytorch.callbacks import ModelCheckpoint

import askexpert.callbacks.guard as guard_module
from askexpert.callbacks.guard import NonFiniteGuard
from askexpert.errors import DivergenceError


class Poisoned(pl.LightningModule):
    """A tiny regression model whose loss (or gradient) turns non-finite from a given optimizer step on."""

    def __init__(self, bad_from: int | None = None, what: str = "loss", poison_weights_at_epoch_end: bool = False):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_from, self.what, self.poison_weights = bad_from, what, poison_weights_at_epoch_end

    def training_step(self, batch, batch_idx):
        x = torch.ones(8, 4)
        loss = self.layer(x).pow(2).mean()
        bad = self.bad_from is not None and self.global_step + 1 >= self.bad_from
        if bad and self.what == "loss":
            loss = loss * float("nan")
        if bad and self.what == "grad":  # finite loss, infinite gradient
            loss = loss + _inf_grad(self.layer.bias)
        return loss

    def on_train_epoch_end(self):
        if self.poison_weights:
            with torch.no_grad():
                self.layer.weight[0, 0] = float("nan")

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(10, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _inf_grad(param: torch.Tensor) -> torch.Tensor:
    """A term that is 0 in the forward pass and has an infinite gradient for `param`."""
    return InfGrad.apply(param.sum())


class InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def fit(module, tmp_path, epochs=2, log_every=5):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", monitor=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        log_every_n_steps=log_every,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[NonFiniteGuard(), checkpoint],
    )
    trainer.fit(module)
    return trainer


def test_first_bad_step_is_reported_exactly_though_read_once_per_interval(tmp_path):
    # 10 steps per epoch; step 13 turns bad, the flags are read every 5 steps (at step 15)
    with pytest.raises(DivergenceError) as caught:
        fit(Poisoned(bad_from=13), tmp_path)
    err = caught.value
    assert (err.step, err.epoch) == (13, 1)
    message = str(err)
    assert "non-finite loss at step 13 (epoch 1, batch 2)" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'} (epoch 0, step 10)" in message
    assert "--model.lr" not in message  # a module without those hyper-parameters gets no advice about them
    assert "gradient clipping (--trainer.gradient_clip_val 1.0)" in message
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_nothing_is_saved_when_it_diverges_in_the_first_epoch(tmp_path):
    with pytest.raises(DivergenceError, match="no checkpoint was written before it diverged") as caught:
        fit(Poisoned(bad_from=2), tmp_path, log_every=50)  # read at the epoch end (interval capped at 10)
    assert caught.value.step == 2 and caught.value.last_good is None
    assert not (tmp_path / "checkpoints").exists()


def test_a_non_finite_gradient_with_a_finite_loss_stops_too(tmp_path):
    with pytest.raises(DivergenceError, match="non-finite gradient norm at step 4"):
        fit(Poisoned(bad_from=4, what="grad"), tmp_path)


def test_weights_poisoned_after_the_last_check_are_never_written(tmp_path):
    # the module breaks its weights after the guard's epoch-end check, just before the checkpoint is saved
    with pytest.raises(DivergenceError, match="non-finite weights when saving a checkpoint"):
        fit(Poisoned(poison_weights_at_epoch_end=True), tmp_path)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_healthy_run_logs_the_gradient_norm_and_finishes(tmp_path):
    trainer = fit(Poisoned(), tmp_path, epochs=1, log_every=2)
    assert "train/grad_norm" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train/grad_norm"])


def test_steps_skipped_by_the_fp16_loss_scaler_are_not_divergence(tmp_path, monkeypatch):
    # Under a GradScaler only a loss that stays non-finite is divergence; gradients are not checked at all.
    monkeypatch.setattr(guard_module, "_loss_scaler", lambda trainer: object())
    monkeypatch.setattr(guard_module, "SCALER_PATIENCE", 4)

    class Isolated(Poisoned):
        """Two isolated bad batches, whose steps are skipped as the scaler would skip them."""

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx in (3, 6) else loss

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer_closure()
            if all(torch.isfinite(p.grad).all() for p in self.parameters()):
                optimizer.step()

    fit(Isolated(), tmp_path / "isolated", epochs=1)
    with pytest.raises(DivergenceError, match="non-finite loss for 4 steps in a row"):
        fit(Poisoned(bad_from=3), tmp_path / "persistent", epochs=1)


def test_fit_with_a_diverging_learning_rate_stops_with_one_line_and_status_3(tmp_path, capsys, tiny_args):
    run_dir = tmp_path / "run"
    args = ["fit", *tiny_args, "--model.lr", "1e30", "--trainer.max_epochs", "3", "--trainer.default_root_dir"]
    code, out, err = run_main([*args, str(run_dir)], capsys)
    assert code == 3
    lines = [line for line in err.splitlines() if line.startswith("askexpert:")]
    assert len(lines) == 1 and "Traceback" not in err
    expected = f"askexpert: error: training diverged in {run_dir} (GeneralistModule vit_micro_patch8_32)"
    assert lines[0].startswith(expected)
    assert "non-finite loss at step" in lines[0] and "--model.lr, now 1e+30" in lines[0]
    assert not (run_dir / "checkpoints").exists()


def test_weights_broken_before_a_mid_epoch_validation_never_reach_a_weights_only_checkpoint(tmp_path):
    """best.ckpt is weights-only (no `on_save_checkpoint` call) and saved at validation end: checked there."""

    class BrokenBeforeValidation(Poisoned):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if batch_idx == 4:
                with torch.no_grad():
                    self.layer.weight.fill_(float("inf"))

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(torch.ones(2, 4)).mean())

        def val_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", save_weights_only=True, monitor=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        val_check_interval=5,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NonFiniteGuard(), best],
    )
    with pytest.raises(DivergenceError, match="non-finite weights after validation"):
        trainer.fit(BrokenBeforeValidation())
    assert not (tmp_path / "checkpoints").exists()


def test_the_checkpoint_writer_refuses_non_finite_weights_whoever_saves(tmp_path):
    from askexpert.files.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "x.ckpt"
    with pytest.raises(DivergenceError, match="the weights are non-finite .epoch 3, step 7."):
        bad = {"epoch": 3, "global_step": 7, "state_dict": {"w": torch.tensor([1.0, float("nan")])}}
        AtomicCheckpointIO().save_checkpoint(bad, path)
    assert list(tmp_path.iterdir()) == []
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 2

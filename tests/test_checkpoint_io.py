"""AtomicCheckpointIO: the file a reader finds is always a complete checkpoint, and a run resumes from it."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from askexpert.files.checkpoint_io import AtomicCheckpointIO
from askexpert.files.checkpoints import check_checkpoint_file
from askexpert.modules import GeneralistModule
from datamodules.datamodule import ImageDataModule


def test_a_write_replaces_the_file_completely_and_leaves_nothing_behind(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    check_checkpoint_file(str(path))
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.zeros(3))
    assert os.listdir(path.parent) == ["last.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as any other file the run writes


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"epoch": 1, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 0
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_trainer_writes_and_resumes_through_it(tmp_path):
    def trainer(epochs: int) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            limit_train_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            plugins=[AtomicCheckpointIO()],
        )

    def parts():
        data = ImageDataModule(synthetic_train_per_class=10, synthetic_test_per_class=1, batch_size=32)
        return GeneralistModule(model_name="vit_micro_patch8_32", num_classes=100, warmup_epochs=0), data

    first = trainer(1)
    first.fit(*parts())
    path = tmp_path / "last.ckpt"
    first.save_checkpoint(path)
    second = trainer(2)
    second.fit(*parts(), ckpt_path=str(path))
    assert second.global_step == 4

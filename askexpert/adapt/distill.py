"""Between two rounds: the generalist learns the experts' answers without forgetting its own training data.

Every batch holds exactly `round(replay * batch_size)` images of the generalist's original training split
(cross-entropy on their true labels, with the generalist's own label smoothing) and the rest from the soft labels
kept so far (KL divergence to the expert's probabilities, both softened by `temperature` and scaled by T², as in
Hinton et al.'s distillation). The loss is the per-image mean over the whole batch, so the replay share is also
the share of the loss. An exact count per batch (not a rounded expectation like the strategies' sampler) is what
"the replay share" promises, and what tests/test_adapt.py counts.

An epoch is one pass over the kept images (`ceil(kept / stream images per batch)` steps); both pools are read as
successive random permutations, so every kept image is seen equally often and the last batch is full. The
training is a plain Lightning `fit` (CPU or the one GPU there is, no checkpoint and no logger: a round is saved
by `rounds.py` once it is measured) with the house's NonFiniteGuard: a round never goes on after a NaN.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from askexpert.callbacks.guard import NonFiniteGuard
from datamodules.augment import random_crop_flip
from datamodules.datamodule import keep_batch

STREAM = -1  # the label of a kept (stream) image in a batch: it learns from its soft label instead


@dataclass(frozen=True)
class DistillSettings:
    """How one round fine-tunes (the command's options; all of them are part of adapt.json's identity)."""

    epochs: int = 2
    batch_size: int = 128
    replay: float = 0.5
    temperature: float = 1.0
    lr: float = 5e-5  # chosen on validation at the evidence scale (askexpert/commands/adapt.py)
    weight_decay: float = 0.05

    def replay_count(self) -> int:
        """Replay images in every batch (rounded half up)."""
        return int(math.floor(self.replay * self.batch_size + 0.5))

    def steps_per_epoch(self, kept: int) -> int:
        per_batch = self.batch_size - self.replay_count()
        return math.ceil(kept / (per_batch if per_batch > 0 else self.batch_size))


class _Pool:
    """Successive random permutations of `members`, read `count` at a time."""

    def __init__(self, members: torch.Tensor, generator: torch.Generator) -> None:
        self.members, self.generator = members, generator
        self.order, self.position = members[:0], 0

    def take(self, count: int) -> torch.Tensor:
        taken = []
        while count > 0:
            if self.position >= len(self.order):
                self.order, self.position = self.members[torch.randperm(len(self.members), generator=self.generator)], 0
            chunk = self.order[self.position : self.position + count]
            self.position, count = self.position + len(chunk), count - len(chunk)
            taken.append(chunk)
        return torch.cat(taken) if taken else self.members[:0]


class ReplayBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size - replay_count` stream rows (0 .. stream-1) and `replay_count` replay rows (stream ..
    stream+replay-1) of a `MixedImages` dataset, shuffled together; epoch e draws from (seed, e)."""

    def __init__(self, stream: int, replay: int, batch_size: int, replay_count: int, steps: int, seed: int) -> None:
        if (stream == 0 and replay_count < batch_size) or (replay == 0 and replay_count > 0):
            raise ValueError("a pool the batches draw from is empty")  # the callers never ask: a bug if they do
        self.stream = torch.arange(stream)
        self.replay = torch.arange(stream, stream + replay)
        self.batch_size, self.replay_count, self.steps, self.seed = batch_size, replay_count, steps, seed
        self.epoch = 0  # counted here: Lightning calls `set_epoch` on a loader's sampler, not on its batch sampler

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        stream, replay = _Pool(self.stream, generator), _Pool(self.replay, generator)
        for _ in range(self.steps):
            batch = torch.cat([stream.take(self.batch_size - self.replay_count), replay.take(self.replay_count)])
            yield batch[torch.randperm(len(batch), generator=generator)].tolist()


class MixedImages(Dataset):
    """Kept images with their (softened) soft labels, then replay images with their labels; fetched by batch."""

    def __init__(self, kept: torch.Tensor, teacher: torch.Tensor, replay: torch.Tensor, labels: torch.Tensor) -> None:
        self.kept, self.teacher, self.replay, self.labels = kept, teacher, replay, labels

    def __len__(self) -> int:
        return len(self.kept) + len(self.replay)

    def __getitems__(self, indices: list[int]):
        rows = torch.as_tensor(indices)
        is_stream = rows < len(self.kept)
        kept_rows, replay_rows = rows[is_stream], rows[~is_stream] - len(self.kept)
        images = torch.empty(len(rows), *self.kept.shape[1:], dtype=torch.uint8)
        images[is_stream], images[~is_stream] = self.kept[kept_rows], self.replay[replay_rows]
        teacher = torch.zeros(len(rows), self.teacher.shape[1])
        teacher[is_stream] = self.teacher[kept_rows]
        labels = torch.full((len(rows),), STREAM, dtype=torch.long)
        labels[~is_stream] = self.labels[replay_rows]
        return images, teacher, labels


class DistillModule(pl.LightningModule):
    """The generalist (a submodule: its network and its own normalisation) trained on mixed batches."""

    def __init__(self, generalist, settings: DistillSettings, steps: int, crop_padding: int, flip: bool) -> None:
        super().__init__()
        self.generalist, self.settings, self.total_steps = generalist, settings, steps
        self.crop_padding, self.flip = crop_padding, flip
        self.label_smoothing = float(generalist.hparams.get("label_smoothing", 0.0))
        self.replay_per_batch: list[torch.Tensor] = []  # on the device, read once after training (no sync a step)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, teacher, labels = batch
        images = random_crop_flip(images, padding=self.crop_padding, flip=self.flip)
        logits = self.generalist.net(self.generalist.training_inputs(images))
        t = self.settings.temperature
        replay = labels != STREAM
        log_student = F.log_softmax(logits / t, dim=-1)
        kl = (teacher * (teacher.clamp_min(1e-12).log() - log_student)).sum(-1) * (t * t)
        ce = F.cross_entropy(logits, labels.clamp_min(0), label_smoothing=self.label_smoothing, reduction="none")
        self.replay_per_batch.append(replay.sum())
        return torch.where(replay, ce, kl).sum() / len(labels)

    def configure_optimizers(self):
        s = self.settings
        optimizer = torch.optim.AdamW(self.generalist.net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.total_steps), eta_min=0.1 * s.lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def soften(soft_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities p at temperature T: softmax(log p / T) (the expert's logits are not kept, its answer is)."""
    return (soft_labels.double().clamp_min(1e-12).log() / temperature).softmax(-1).float()


def fine_tune(generalist, kept: tuple[torch.Tensor, torch.Tensor], replay: tuple[torch.Tensor, torch.Tensor],
              settings: DistillSettings, seed: int, augment: tuple[int, bool], root: str) -> dict:  # fmt: skip
    """Fine-tune `generalist` in place on the kept (images, soft labels) mixed with replay (images, labels).

    `augment`: the run's (crop padding, flip). Returns what it trained on: steps, stream and replay images seen,
    and the replay images of each batch (all equal to `settings.replay_count()`)."""
    images, soft = kept
    steps = settings.steps_per_epoch(len(images))
    sampler = ReplayBatchSampler(len(images), len(replay[1]), settings.batch_size, settings.replay_count(), steps, seed)
    dataset = MixedImages(images, soften(soft, settings.temperature), *replay)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=keep_batch, num_workers=0)
    module = DistillModule(generalist, settings, steps * settings.epochs, *augment)
    pl.seed_everything(seed, verbose=False)  # augmentation draws: the same round trains the same way again
    lightning_loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in lightning_loggers]
    try:
        for logger in lightning_loggers:  # "GPU available: ..." and friends: not this command's output
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            # Lightning's notes for a plain fit (loader workers, its own deprecations): nothing a user can act on
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            trainer = pl.Trainer(
                accelerator="auto",
                devices=1,
                max_epochs=settings.epochs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                callbacks=[NonFiniteGuard(log_grad_norm=False)],
                default_root_dir=root,
            )
            module.train()  # a loaded checkpoint is in eval mode, and Lightning keeps each module's mode
            trainer.fit(module, train_dataloaders=loader)
    finally:
        for logger, level in zip(lightning_loggers, levels, strict=True):
            logger.setLevel(level)
    generalist.cpu().eval()
    per_batch = torch.stack(module.replay_per_batch).tolist() if module.replay_per_batch else []
    return {
        "steps": len(per_batch),
        "replay_images_seen": int(sum(per_batch)),
        "stream_images_seen": len(per_batch) * settings.batch_size - int(sum(per_batch)),
        "replay_per_batch": sorted(set(per_batch)),
    }

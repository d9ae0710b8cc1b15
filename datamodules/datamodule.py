"""One LightningDataModule for every source: train / val / test splits, held in memory as uint8.

Why it looks like this:
- Images stay uint8 (CIFAR-100's 50k training images are 150 MB) and are indexed a whole batch at a time
  (`__getitems__`), so a DataLoader with no workers keeps up with the model on CPU and GPU alike.
- Random crop + flip (and RandAugment / TrivialAugment, drawn per image) run on the whole batch after it
  reached the training device (`on_after_batch_transfer`), at the stored size; resizing to the models'
  `image_size` and normalisation belong to the model, so a checkpoint carries its own input
  statistics and predicting on raw images needs nothing from this class.
- The loaders are plain `DataLoader(dataset, batch_size, shuffle | sampler)`, so Lightning can still swap in
  a `DistributedSampler` for DDP and specialization strategies can supply their own samplers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from askexpert.errors import UserError
from datamodules.augment import AUTO_AUGMENT_POLICIES, auto_augment, random_crop_flip
from datamodules.sources import SourceName, load_source, source_metadata
from datamodules.splits import ImageSplits

SPLITS = ("train", "val", "calib", "test")
CIFAR100_SIZE = 32  # CIFAR-100's images, and the stand-in's default


def stored_image_size(source: str, stored_size: int | None, image_size: int) -> int:
    """Side of the images a source is held at in memory (see `ImageDataModule`'s `stored_size`)."""
    if source == "cifar100":
        return CIFAR100_SIZE
    if source == "synthetic":
        return stored_size or CIFAR100_SIZE
    return stored_size or image_size


class TensorImageDataset(Dataset):
    """uint8 images and int64 labels, fetched a batch of indices at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.images.is_cuda and idx.device.type == "cpu":
            # Indexing a GPU tensor with a host index copies the index with a blocking copy, which waits for
            # every queued kernel (a sync per batch). From pinned memory the copy is asynchronous (torch keeps
            # the pinned block until the copy is done).
            idx = idx.pin_memory().to(self.images.device, non_blocking=True)
        return self.images[idx], self.labels[idx]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for `TensorImageDataset`: `__getitems__` already returns the stacked batch."""
    return batch


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, held_out) with `fraction` of every class held out, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    held_out = []
    for cls in labels.unique():
        members = order[labels[order] == cls]
        # at least one per class when anything is held out, so small classes are still validated
        count = max(1, round(fraction * len(members))) if fraction > 0 and len(members) > 1 else 0
        held_out.append(members[:count])
    held = torch.cat(held_out) if held_out else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held.sort().values


class ImageDataModule(pl.LightningDataModule):
    """Train / val / test splits of one image source, with per-class views for the experts.

    Args:
        source: `cifar100` (official python layout), `imagefolder` (ROOT/{train,test}/<class>/*) or
            `synthetic` (the built-in offline stand-in with CIFAR-100's shape and hierarchy).
        root: folder of the dataset (not used by `synthetic`).
        download: download CIFAR-100 through torchvision when its files are absent (needs a network).
        verify_checksums: check CIFAR-100's official MD5 sums before reading.
        image_size: side of the square images the models see (linked into the model; the model resizes the stored
            images to it on the device, batched, in training, evaluation, prediction and routing alike).
        stored_size: side of the images held in memory, which the edge device would send: CIFAR-100's own 32 px
            (the only value it takes); the synthetic stand-in renders at it (default 32); an image folder is
            decoded at it (default `image_size`). Augmentation runs at this size, before the model's resize.
        val_fraction: share of each training class held out for validation (seeded by `seed`).
        calib_fraction: share of each training class held out for calibration (the routing threshold and the
            temperature, see docs/collaborative.md), after the validation holdout; 0 (default): none, and
            calibration uses the validation split. Neither trained on nor used to select checkpoints.
        seed: seed of the validation holdout.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and prediction.
        num_workers: DataLoader workers; 0 is right for in-memory uint8 tensors (workers are started per epoch).
        crop_padding: padding of the random crop, in stored pixels (0 disables it).
        flip: random horizontal flips during training.
        auto_augment: `randaugment` or `trivialaugment` (torchvision's ops, drawn per image, batched on the
            device; `datamodules/augment.py`); unset: none.
        auto_augment_ops: RandAugment's number of ops per image.
        auto_augment_magnitude: RandAugment's magnitude (0-30).
        synthetic_train_per_class: stand-in training images per class (CIFAR-100 has 500).
        synthetic_test_per_class: stand-in test images per class (CIFAR-100 has 100; more is cheap and
            makes accuracy comparisons less noisy).
        synthetic_seed: which stand-in dataset to generate; experiments vary `seed`, not this.
        max_memory_gb: refuse to load a dataset that needs more memory than this.
        resident: while a Trainer runs on a GPU, keep the splits there (uint8: CIFAR-100's training split is
            150 MB) so batches are cut on the device and never cross PCIe; ignored on CPU and with workers.
    """

    def __init__(
        self,
        source: SourceName = "synthetic",
        root: str | None = None,
        download: bool = False,
        verify_checksums: bool = True,
        image_size: int = 32,
        stored_size: int | None = None,
        val_fraction: float = 0.1,
        calib_fraction: float = 0.0,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        crop_padding: int = 4,
        flip: bool = True,
        auto_augment: str | None = None,
        auto_augment_ops: int = 2,
        auto_augment_magnitude: int = 9,
        synthetic_train_per_class: int = 500,
        synthetic_test_per_class: int = 100,
        synthetic_seed: int = 0,
        max_memory_gb: float = 8.0,
        resident: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= calib_fraction < 1.0 or val_fraction + calib_fraction >= 1.0:
            raise UserError(
                f"--data.calib_fraction must be in [0, 1) and leave training images after --data.val_fraction "
                f"{val_fraction}, got {calib_fraction}"
            )
        if image_size < 1:
            raise UserError(f"--data.image_size must be a positive number of pixels, got {image_size}")
        if stored_size is not None and stored_size < 1:
            raise UserError(f"--data.stored_size must be a positive number of pixels, got {stored_size}")
        if source == "cifar100" and stored_size not in (None, CIFAR100_SIZE):
            raise UserError(
                f"CIFAR-100's images are {CIFAR100_SIZE} px: --data.stored_size must be unset or {CIFAR100_SIZE} (the "
                f"model resizes them to --data.image_size {image_size})"
            )
        if auto_augment is not None and auto_augment not in AUTO_AUGMENT_POLICIES:
            raise UserError(
                f"unknown --data.auto_augment {auto_augment!r}; policies: {', '.join(AUTO_AUGMENT_POLICIES)}"
            )
        if auto_augment_ops < 0 or not 0 <= auto_augment_magnitude <= 30:
            raise UserError("--data.auto_augment_ops must not be negative and --data.auto_augment_magnitude in [0, 30]")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UserError(f"--data.{name} must be at least 1, got {value}")
        if crop_padding < 0 or num_workers < 0:
            raise UserError("--data.crop_padding and --data.num_workers must not be negative")
        if root is not None:
            root = os.path.expanduser(root)
        self.save_hyperparameters()
        self.metadata = source_metadata(source, root)
        self._splits: ImageSplits | None = None
        # Set by a specialization strategy for the length of a fit: draws every training batch.
        self.train_batch_sampler: Sampler[list[int]] | None = None
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._resident: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- what the models need to know before any image is loaded -------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.metadata.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    @property
    def superclass_names(self) -> list[str] | None:
        return self.metadata.superclass_names

    @property
    def class_to_superclass(self) -> list[int] | None:
        return self.metadata.class_to_superclass

    @property
    def image_size(self) -> int:
        """Side of the images the models see (linked into the model by the CLI)."""
        return self.hparams.image_size

    @property
    def stored_image_size(self) -> int:
        """Side of the images held in memory (and sent by the edge device), see `stored_size`."""
        h = self.hparams
        return stored_image_size(h.source, h.get("stored_size"), h.image_size)

    @property
    def stand_in(self) -> bool:
        return self.hparams.source == "synthetic"

    # -- loading -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.hparams.source == "cifar100" and self.hparams.download:
            from datamodules.cifar100 import load_cifar100

            load_cifar100(self.hparams.root, download=True, verify_checksums=self.hparams.verify_checksums)

    def setup(self, stage: str | None = None) -> None:
        """Load the source once and cut the validation holdout; later calls are free."""
        if self._tensors:
            return
        h = self.hparams
        splits = load_source(
            h.source,
            h.root,
            download=False,
            verify_checksums=h.verify_checksums,
            image_size=self.stored_image_size,
            max_memory_gb=h.max_memory_gb,
            synthetic_train_per_class=h.synthetic_train_per_class,
            synthetic_test_per_class=h.synthetic_test_per_class,
            synthetic_seed=h.synthetic_seed,
        )
        if splits.class_names != self.metadata.class_names:
            raise UserError("the dataset's classes changed between reading its metadata and its images")
        train_idx, val_idx = stratified_holdout(splits.train_labels, h.val_fraction, h.seed)
        # The calibration split comes out of what validation left, so the validation split (which selects
        # checkpoints) is the same images with or without it; its own seed keeps the two draws independent.
        calib_idx = torch.empty(0, dtype=torch.long)
        if h.get("calib_fraction", 0.0) > 0:
            share = h.calib_fraction / (1.0 - h.val_fraction)  # of what is left: about calib_fraction of each class
            keep, held = stratified_holdout(splits.train_labels[train_idx], share, h.seed + 1)
            train_idx, calib_idx = train_idx[keep], train_idx[held]
        self._tensors = {
            "train": (splits.train_images[train_idx], splits.train_labels[train_idx]),
            "val": (splits.train_images[val_idx], splits.train_labels[val_idx]),
            "calib": (splits.train_images[calib_idx], splits.train_labels[calib_idx]),
            "test": (splits.test_images, splits.test_labels),
        }
        self._splits = splits

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) of `split` (train, val, calib or test; calib is empty without a calibration
        split)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        self.setup()
        return self._tensors[split]

    def loader_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors a loader indexes: copies on the Trainer's GPU when `resident`, else the host tensors."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else None
        if not self.hparams.resident or self.hparams.num_workers > 0 or device is None or device.type != "cuda":
            return self.tensors(split)
        key = (split, str(device))
        if key not in self._resident:
            self._resident[key] = tuple(t.to(device) for t in self.tensors(split))
        return self._resident[key]

    def split_sizes(self) -> dict[str, int]:
        """Images per split; calib only when there is a calibration split (so data descriptions of runs without
        one read as before)."""
        sizes = {split: len(self.tensors(split)[1]) for split in SPLITS}
        return sizes if sizes["calib"] else {split: size for split, size in sizes.items() if split != "calib"}

    def describe(self) -> dict:
        """What a report needs to say about the data it was computed on."""
        return {
            "source": self.hparams.source,
            "root": self.hparams.root,
            "num_classes": self.num_classes,
            **{f"{split}_size": size for split, size in self.split_sizes().items()},
            "stand_in": self.stand_in,
        }

    # -- per-expert views ----------------------------------------------------------------------------
    def indices_of_classes(self, split: str, classes: Sequence[int]) -> torch.Tensor:
        """Indices of the samples of `split` whose label is one of `classes` (an expert's subset)."""
        labels = self.tensors(split)[1]
        wanted = torch.as_tensor(list(classes), dtype=torch.long)
        if len(wanted) == 0:
            raise UserError("an expert's class subset is empty")
        bad = wanted[(wanted < 0) | (wanted >= self.num_classes)]
        if len(bad):
            raise UserError(f"class id {int(bad[0])} is out of range for {self.num_classes} classes")
        return torch.nonzero(torch.isin(labels, wanted)).flatten()

    def dataloader(
        self,
        split: str,
        indices: torch.Tensor | None = None,
        shuffle: bool = False,
        sampler: Sampler | None = None,
        batch_size: int | None = None,
        batch_sampler: Sampler[list[int]] | None = None,
    ) -> DataLoader:
        """A loader over `split`, optionally restricted to `indices` or driven by a custom (batch) sampler."""
        images, labels = self.loader_tensors(split)
        if indices is not None:
            images, labels = images[indices.to(images.device)], labels[indices.to(labels.device)]
        if batch_sampler is not None:
            return DataLoader(
                TensorImageDataset(images, labels),
                batch_sampler=batch_sampler,
                num_workers=self.hparams.num_workers,
                collate_fn=keep_batch,
            )
        training = split == "train"
        return DataLoader(
            TensorImageDataset(images, labels),
            batch_size=batch_size or (self.hparams.batch_size if training else self.hparams.eval_batch_size),
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            drop_last=training and len(labels) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=keep_batch,
            # Not persistent: a persistent loader draws its workers' base seed from the global generator once per
            # run, so a resumed run (which builds its loaders again) would draw once more than an uninterrupted one
            # and every random stream after it would differ (askexpert/callbacks/rng.py). Restarting workers costs
            # little: they only index in-memory tensors.
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_batch_sampler is not None:
            return self.dataloader("train", batch_sampler=self.train_batch_sampler)
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment training batches on the device they were moved to."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            images, labels = batch
            h = self.hparams
            images = random_crop_flip(images, padding=h.crop_padding, flip=h.flip)
            if h.get("auto_augment"):
                images = auto_augment(images, h.auto_augment, h.auto_augment_ops, h.auto_augment_magnitude)
            return images, labels
        return batch

"""The in-memory form every data source produces: uint8 image tensors plus their label metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSplits:
    """Train and test images of one source, held in memory as uint8 (N, 3, H, W) tensors.

    `class_to_superclass[c]` is the superclass index of class `c` (None when the source has no hierarchy).
    `stand_in` is True only for the built-in synthetic source, so reports can never pass it off as real data.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    superclass_names: list[str] | None = None
    class_to_superclass: list[int] | None = None
    stand_in: bool = False

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"{name} images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(f"{name} labels must be int64 of shape ({images.shape[0]},)")
        if self.class_to_superclass is not None and len(self.class_to_superclass) != len(self.class_names):
            raise ValueError("class_to_superclass must have one entry per class")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

"""Building the experts' partition: from the partition settings and, for confusion partitions and overlap, the
generalist's confusion on its validation split. The one way the `partition` command and the pipeline's partition
stage (and its early check) build it."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from askexpert.collab.logits import batched_logits
from askexpert.errors import UserError
from askexpert.files.checkpoints import check_same_classes
from askexpert.modules.loading import load_classifier
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import Partition, balanced_largest, build_partition, check_overlap


def validation_confusion(checkpoint: str, datamodule: ImageDataModule) -> torch.Tensor:
    """(C, C) counts of true class (rows) vs the generalist's prediction (columns) on the validation split."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_classifier(checkpoint, map_location=device)
    check_same_classes(model, datamodule, f"generalist {checkpoint}")
    if datamodule.split_sizes()["val"] == 0:
        raise UserError("a confusion partition needs a validation split: set --data.val_fraction above 0")
    logits = batched_logits(model, (images for images, _ in datamodule.dataloader("val")))
    matrix = MulticlassConfusionMatrix(datamodule.num_classes)
    matrix.update(logits[:, : datamodule.num_classes], datamodule.tensors("val")[1])
    return matrix.compute()


def partition_from_settings(settings, datamodule: ImageDataModule, confusion: torch.Tensor | None) -> Partition:
    """`build_partition` from settings with the partition options (this command's, or a pipeline's section)."""
    return build_partition(
        settings.method,
        datamodule.class_names,
        num_experts=settings.num_experts,
        class_to_superclass=datamodule.class_to_superclass,
        confusion=confusion,
        experts=settings.experts,
        overlap=settings.overlap if confusion is not None else 0,
        seed=settings.seed,
        allow_uncovered=settings.allow_uncovered,
    )


def check_overlap_setting(settings, datamodule: ImageDataModule, option: str = "--overlap") -> None:
    """`settings.overlap` against the experts' sizes, before the generalist's confusion exists (`check_overlap`): a
    confusion partition is balanced, so its sizes follow from the settings; any other is built now without it."""
    if settings.method == "confusion":
        largest = balanced_largest(datamodule.num_classes, settings.num_experts)
    else:
        largest = max(len(group) for group in partition_from_settings(settings, datamodule, confusion=None).experts)
    check_overlap(settings.overlap, datamodule.num_classes, largest, option)

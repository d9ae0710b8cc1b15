"""The three data sources behind `--data.source`, each a loader and a cheap metadata lookup.

Metadata (class names and the superclass map) is needed when the CLI links `data.num_classes` into the
model, before any image is decoded, so every source can answer it from names and folder listings alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Literal

from askexpert.errors import UserError
from datamodules.splits import ImageSplits

SourceName = Literal["cifar100", "imagefolder", "synthetic"]
SOURCE_NAMES: tuple[str, ...] = ("cifar100", "imagefolder", "synthetic")


@dataclass(frozen=True)
class SourceMetadata:
    class_names: list[str]
    superclass_names: list[str] | None
    class_to_superclass: list[int] | None


def _check_source(source: str, root: str | None) -> None:
    if source not in SOURCE_NAMES:
        raise UserError(f"unknown data source {source!r}; known sources: {', '.join(SOURCE_NAMES)}")
    if source != "synthetic" and not root:
        raise UserError(f"data source {source!r} needs --data.root PATH (the folder holding the dataset)")


# Set while a dry run plans (`planning_without_data`): CIFAR-100's classes are known without its files.
_PLANNING_WITHOUT_DATA = contextvars.ContextVar("planning_without_data", default=False)


@contextlib.contextmanager
def planning_without_data():
    """While a dry run plans, a CIFAR-100 root that is not on disk stands for the official dataset (its 100
    classes and 20 superclasses from datamodules/labels.py), so a GPU config can be checked on a laptop without
    the data; a real run still needs the files and says so."""
    token = _PLANNING_WITHOUT_DATA.set(True)
    try:
        yield
    finally:
        _PLANNING_WITHOUT_DATA.reset(token)


def cifar100_missing(root: str | None) -> bool:
    """Whether a CIFAR-100 root holds no dataset yet (what a dry run then assumes)."""
    from datamodules.cifar100 import cifar100_present

    return not cifar100_present(root or "")


def source_metadata(source: str, root: str | None) -> SourceMetadata:
    """Class names and hierarchy of a source without loading its images."""
    _check_source(source, root)
    if source == "cifar100":
        from datamodules.cifar100 import cifar100_metadata, official_metadata

        if _PLANNING_WITHOUT_DATA.get() and cifar100_missing(root):
            return SourceMetadata(*official_metadata())
        return SourceMetadata(*cifar100_metadata(root))
    if source == "imagefolder":
        from datamodules.imagefolder import imagefolder_metadata

        return SourceMetadata(*imagefolder_metadata(root))
    from datamodules.synthetic import synthetic_metadata

    return SourceMetadata(*synthetic_metadata())


def load_source(
    source: str,
    root: str | None,
    *,
    download: bool = False,
    verify_checksums: bool = True,
    image_size: int = 32,
    max_memory_gb: float = 8.0,
    synthetic_train_per_class: int = 500,
    synthetic_test_per_class: int = 100,
    synthetic_seed: int = 0,
) -> ImageSplits:
    """All train and test images of a source, as uint8 tensors in memory."""
    _check_source(source, root)
    if source == "cifar100":
        from datamodules.cifar100 import load_cifar100

        return load_cifar100(root, download=download, verify_checksums=verify_checksums)
    if source == "imagefolder":
        from datamodules.imagefolder import load_imagefolder

        return load_imagefolder(root, image_size=image_size, max_memory_gb=max_memory_gb)
    needed_gb = 100 * (synthetic_train_per_class + synthetic_test_per_class) * 3 * image_size**2 / 1e9
    if needed_gb > max_memory_gb:
        raise UserError(
            f"the synthetic stand-in at this size needs {needed_gb:.1f} GB in memory, over "
            f"--data.max_memory_gb {max_memory_gb:g}; lower its per-class sizes or raise the cap"
        )
    return _cached_synthetic(synthetic_train_per_class, synthetic_test_per_class, synthetic_seed, image_size)


@functools.lru_cache(maxsize=2)
def _cached_synthetic(train_per_class: int, test_per_class: int, seed: int, image_size: int) -> ImageSplits:
    """The stand-in is deterministic, so runs in one process (tests, comparisons) generate it once."""
    from datamodules.synthetic import make_synthetic

    return make_synthetic(
        train_per_class=train_per_class, test_per_class=test_per_class, seed=seed, image_size=image_size
    )

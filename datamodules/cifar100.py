"""Reader for the official CIFAR-100 "python version" files (`cifar-100-python/{train,test,meta}`).

This is the layout `torchvision.datasets.CIFAR100` downloads and extracts, so a copy fetched by torchvision,
by hand, or by any other tool is read the same way. The pickles are read directly (instead of through the
torchvision dataset class) so that both fine and coarse labels are kept: the superclass hierarchy is what the
near-edge expert uses. Nothing is cached on disk; the 150 MB of pixels are decoded in well under a second.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
from typing import Any

import numpy as np
import torch

from askexpert.errors import UserError
from datamodules.labels import CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE
from datamodules.splits import ImageSplits

BASE_FOLDER = "cifar-100-python"
FILE_NAMES = ("train", "test", "meta")
# The official MD5s, identical to `torchvision.datasets.CIFAR100.train_list/test_list/meta`.
MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
IMAGE_SHAPE = (3, 32, 32)
EXPECTED_LAYOUT = f"ROOT/{BASE_FOLDER}/{{train,test,meta}} (the official CIFAR-100 python version)"

Metadata = tuple[list[str], list[str], list[int]]


def load_cifar100(root: str, download: bool = False, verify_checksums: bool = True) -> ImageSplits:
    """Read train and test images with fine labels, plus the names and fine -> coarse map from the files.

    `root` may be the parent folder or the `cifar-100-python` folder itself. `download=True` fetches the
    files through torchvision only when some are absent; it never overwrites a present (possibly modified)
    copy, and checksum verification then decides whether that copy is accepted.
    """
    folder = _resolve_folder(root)
    if download and not _all_present(folder):
        _download(folder)
    _require_files(root, folder, FILE_NAMES)
    if verify_checksums:
        for name in FILE_NAMES:
            _verify_md5(os.path.join(folder, name), MD5[name])
    class_names, superclass_names = _read_meta(folder)
    train_images, train_fine, train_coarse = _read_split(folder, "train", len(class_names), len(superclass_names))
    test_images, test_fine, test_coarse = _read_split(folder, "test", len(class_names), len(superclass_names))
    class_to_superclass = _derive_class_to_superclass(
        class_names, superclass_names, [(train_fine, train_coarse), (test_fine, test_coarse)], folder
    )
    return ImageSplits(
        train_images=train_images,
        train_labels=train_fine,
        test_images=test_images,
        test_labels=test_fine,
        class_names=class_names,
        superclass_names=superclass_names,
        class_to_superclass=class_to_superclass,
    )


def cifar100_metadata(root: str) -> Metadata:
    """Return (class_names, superclass_names, class_to_superclass) without decoding the 50k training images.

    Only `meta` is read when its names are the official ones (the map then comes from `datamodules.labels`);
    a relabelled copy needs its labels, so the (smaller) test pickle is read to derive the map.
    """
    folder = _resolve_folder(root)
    _require_files(root, folder, ("meta",))
    class_names, superclass_names = _read_meta(folder)
    if tuple(class_names) == CIFAR100_FINE_NAMES and tuple(superclass_names) == CIFAR100_COARSE_NAMES:
        return class_names, superclass_names, list(CIFAR100_FINE_TO_COARSE)
    _require_files(root, folder, ("test",))
    _, fine, coarse = _read_split(folder, "test", len(class_names), len(superclass_names))
    return (
        class_names,
        superclass_names,
        _derive_class_to_superclass(class_names, superclass_names, [(fine, coarse)], folder),
    )


def official_metadata() -> Metadata:
    """The official dataset's class names and hierarchy, without its files (a dry run on a machine without them)."""
    return list(CIFAR100_FINE_NAMES), list(CIFAR100_COARSE_NAMES), list(CIFAR100_FINE_TO_COARSE)


def cifar100_present(root: str) -> bool:
    """Whether ROOT holds the official files (the parent of cifar-100-python, or that folder itself)."""
    return bool(root) and _all_present(_resolve_folder(root))


def _resolve_folder(root: str) -> str:
    """Map ROOT to the folder holding the pickles, accepting both the parent and `cifar-100-python` itself."""
    root = os.path.expanduser(root)
    nested = os.path.join(root, BASE_FOLDER)
    if os.path.isdir(nested):
        return nested
    if os.path.basename(os.path.normpath(root)) == BASE_FOLDER or os.path.isfile(os.path.join(root, "meta")):
        return root
    return nested


def _all_present(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in FILE_NAMES)


def _require_files(root: str, folder: str, names: tuple[str, ...]) -> None:
    """Fail with the path and the expected layout, so the user knows exactly what to put where."""
    hint = f"expected {EXPECTED_LAYOUT}; pass --data.download true to fetch it, or put the files there manually"
    if not os.path.isdir(root):
        raise UserError(f"CIFAR-100 root {root!r} does not exist: {hint}")
    missing = [os.path.join(folder, name) for name in names if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"CIFAR-100 file(s) missing: {', '.join(missing)}: {hint}")


def _download(folder: str) -> None:
    """Fetch through torchvision into the parent of `folder`; any failure becomes one actionable line."""
    from torchvision.datasets import CIFAR100

    parent = os.path.dirname(os.path.normpath(folder)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        CIFAR100(parent, train=True, download=True)
    except Exception as exc:  # network, disk and archive errors all mean the same thing to the user
        raise UserError(
            f"downloading CIFAR-100 into {parent!r} failed ({type(exc).__name__}: {exc}); this machine may be "
            f"offline: download cifar-100-python.tar.gz from {CIFAR100.url} elsewhere and extract it so that "
            f"{os.path.join(folder, '{train,test,meta}')} exist"
        ) from exc


def _verify_md5(path: str, expected: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise UserError(
            f"checksum mismatch for {path} (md5 {digest.hexdigest()}, expected {expected}): the file is corrupt or "
            "modified; delete it and re-download (--data.download true), or pass --data.verify_checksums false "
            "to use a deliberately modified copy"
        )


class _DataUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers, so a data file cannot run code."""

    _RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy version keeps it
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol < 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            message = f"refusing to load {module}.{name}, which is not part of CIFAR-100 data"
            raise pickle.UnpicklingError(message) from None


def _load_pickle(path: str) -> dict[str, Any]:
    """Read one official pickle (Python 2 strings, hence latin1) and turn any failure into a UserError."""
    try:
        with open(path, "rb") as handle:
            content = _DataUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # truncated/garbage files raise many types (EOFError, UnpicklingError, ValueError...)
        raise UserError(f"cannot read CIFAR-100 file {path} ({type(exc).__name__}: {exc}); re-download it") from exc
    if not isinstance(content, dict):
        raise UserError(f"CIFAR-100 file {path} does not hold a dict; it is not an official CIFAR-100 pickle")
    return content


def _get(content: dict[str, Any], key: str, path: str) -> Any:
    if key not in content:
        raise UserError(f"CIFAR-100 file {path} has no {key!r} entry; it is not an official CIFAR-100 pickle")
    return content[key]


def _read_meta(folder: str) -> tuple[list[str], list[str]]:
    path = os.path.join(folder, "meta")
    content = _load_pickle(path)
    names = []
    for key in ("fine_label_names", "coarse_label_names"):
        value = _get(content, key, path)
        if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
            raise UserError(f"CIFAR-100 file {path}: {key!r} must be a non-empty list of names")
        if len(set(value)) != len(value):
            raise UserError(f"CIFAR-100 file {path}: {key!r} contains duplicate names")
        names.append(list(value))
    return names[0], names[1]


def _labels(content: dict[str, Any], key: str, count: int, num_names: int, path: str) -> torch.Tensor:
    values = _get(content, key, path)
    try:
        labels = torch.as_tensor(np.asarray(values, dtype=np.int64))
    except (TypeError, ValueError) as exc:
        raise UserError(f"CIFAR-100 file {path}: {key!r} is not a list of integers") from exc
    if labels.shape != (count,):
        raise UserError(f"CIFAR-100 file {path}: {key!r} has shape {tuple(labels.shape)}, expected ({count},)")
    if count and (labels.min() < 0 or labels.max() >= num_names):
        raise UserError(f"CIFAR-100 file {path}: {key!r} has values outside 0..{num_names - 1} (the names in meta)")
    return labels


def _read_split(folder: str, split: str, num_fine: int, num_coarse: int) -> tuple[torch.Tensor, ...]:
    """Return (images uint8 (N, 3, 32, 32), fine labels, coarse labels); rows of `data` are CHW-ordered."""
    path = os.path.join(folder, split)
    content = _load_pickle(path)
    data = _get(content, "data", path)
    pixels = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        shape = getattr(data, "shape", None)
        raise UserError(f"CIFAR-100 file {path}: 'data' must be a uint8 array of shape (N, {pixels}), got {shape}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *IMAGE_SHAPE))
    fine = _labels(content, "fine_labels", len(images), num_fine, path)
    coarse = _labels(content, "coarse_labels", len(images), num_coarse, path)
    return images, fine, coarse


def _derive_class_to_superclass(
    class_names: list[str],
    superclass_names: list[str],
    label_pairs: list[tuple[torch.Tensor, torch.Tensor]],
    folder: str,
) -> list[int]:
    """Build the fine -> coarse map from the labels themselves, so a relabelled copy stays self-consistent."""
    mapping: dict[int, int] = {}
    for fine, coarse in label_pairs:
        for f, c in torch.unique(torch.stack([fine, coarse], dim=1), dim=0).tolist():
            if mapping.setdefault(f, c) != c:
                raise UserError(
                    f"CIFAR-100 labels in {folder}: class {class_names[f]!r} maps to two superclasses "
                    f"({superclass_names[mapping[f]]!r} and {superclass_names[c]!r})"
                )
    official = tuple(class_names) == CIFAR100_FINE_NAMES and tuple(superclass_names) == CIFAR100_COARSE_NAMES
    result = []
    for index, name in enumerate(class_names):
        if index in mapping:
            result.append(mapping[index])
        elif official:
            result.append(CIFAR100_FINE_TO_COARSE[index])
        else:
            raise UserError(f"CIFAR-100 labels in {folder}: class {name!r} never occurs, so its superclass is unknown")
    return result

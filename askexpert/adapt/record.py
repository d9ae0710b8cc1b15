"""What an edge client recorded of its experts' answers (`edge --record FILE`), as `adapt --record FILE` reads it.

A record is a NumPy `.npz` of four arrays:
- `images`: uint8 (N, 3, S, S), the stored images the edge sent (S: the run's stored image size);
- `soft_labels`: float32 (N, C), the class probabilities of the expert that answered each image (rows sum to 1;
  an image a dustbin expert answered "other" is not recorded: there is no label to learn from it);
- `class_names`: unicode (C,), the export's classes, in their order;
- `model_version`: 0-d unicode, the export's version (`ExportBundle.version`) the edge ran.

It is read with `allow_pickle=False`: a file a user hands in is data and can never run code. Every check names
what is wrong in one line, so a record of another run or a damaged copy is refused before anything is written.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from askexpert.errors import UserError
from askexpert.files.atomic import atomic_write_bytes

ARRAYS = ("images", "soft_labels", "class_names", "model_version")
SUM_TOLERANCE = 1e-3  # float32 probabilities of 100 classes sum to 1 within ~1e-6; this only allows rounding


@dataclass(frozen=True)
class Record:
    images: np.ndarray  # uint8 (N, 3, S, S)
    soft_labels: np.ndarray  # float32 (N, C)
    class_names: list[str]
    model_version: str


def write_record(path: str, images, soft_labels, class_names, version: str) -> None:
    """Write a record (the module docstring's format) atomically: readers never see half a file.

    `images` and `soft_labels` may be NumPy arrays or torch tensors. The same checks as `read_record` run first
    (except the run's size and classes, which the writer does not know), so a writer's bug fails here, not later
    in `adapt`."""
    arrays = {
        "images": _numpy(images),
        "soft_labels": _numpy(soft_labels).astype(np.float32, copy=False),
        "class_names": np.asarray(list(class_names), dtype=np.str_),
        "model_version": np.asarray(str(version), dtype=np.str_),
    }
    check_arrays(arrays, path)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_record(path: str, class_names: list[str], stored_size: int) -> Record:
    """The record in `path`, checked against the run's classes and stored image size (one UserError line each)."""
    if not os.path.isfile(path):
        raise UserError(f"--record {path} not found")
    if not zipfile.is_zipfile(path):  # np.load would read anything else as a pickle (and refuse it as one)
        raise UserError(f"--record {path} is damaged or not a NumPy .npz record (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as found:
            missing = [name for name in ARRAYS if name not in found.files]
            if missing:
                raise UserError(f"--record {path} lacks {', '.join(missing)}; it was not written by `edge --record`")
            arrays = {name: found[name] for name in ARRAYS}
    except UserError:
        raise
    except ValueError as err:  # object arrays need pickle, which is refused
        if "allow_pickle" in str(err):
            raise UserError(f"--record {path} holds Python objects (refused: a record is data only)") from None
        raise UserError(f"--record {path} is not a NumPy .npz record ({_first_line(err)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"--record {path} is damaged or not a NumPy .npz record ({_first_line(err)})") from None
    check_arrays(arrays, path)
    names = [str(name) for name in arrays["class_names"]]
    if names != list(class_names):
        raise UserError(f"--record {path} was recorded with other classes than the run's ({len(names)} classes)")
    size = arrays["images"].shape[-1]
    if size != stored_size:
        raise UserError(f"--record {path} holds {size} px images but the run stores {stored_size} px images")
    return Record(arrays["images"], arrays["soft_labels"], names, str(arrays["model_version"]))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_arrays(arrays: dict[str, np.ndarray], path: str) -> None:
    """Shapes, dtypes and values of a record's arrays (the run's classes and size are checked by the reader)."""
    images, soft, names, version = (arrays[name] for name in ARRAYS)
    where = f"record {path}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise UserError(f"{where}: images must be uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise UserError(f"{where} holds no image")
    if names.ndim != 1 or names.dtype.kind != "U" or len(names) < 2:
        raise UserError(f"{where}: class_names must be a 1-d unicode array of the classes, got {names.dtype}")
    if soft.dtype != np.float32 or soft.shape != (len(images), len(names)):
        raise UserError(
            f"{where}: soft_labels must be float32 (N, C) = ({len(images)}, {len(names)}), "
            f"got {soft.dtype} {tuple(soft.shape)}"
        )
    if not np.isfinite(soft).all() or (soft < 0).any():
        raise UserError(f"{where}: soft_labels hold negative or non-finite values")
    worst = float(np.abs(soft.astype(np.float64).sum(1) - 1.0).max())
    if worst > SUM_TOLERANCE:
        raise UserError(f"{where}: soft_labels rows must sum to 1 (class probabilities); one is off by {worst:.3g}")
    if version.ndim != 0 or version.dtype.kind != "U":
        raise UserError(f"{where}: model_version must be a 0-d unicode array, got {version.dtype} {version.shape}")

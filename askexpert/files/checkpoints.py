"""Checking and loading checkpoint files: one clear error for a missing, truncated, corrupt or unsafe file.

Lightning and torch would fail deep inside unpickling with a message about zip records; a user who
passed the wrong file deserves to hear which file is broken. torch checkpoints are zip archives with a
CRC-32 per member, so integrity can be checked without unpickling anything.

A checkpoint is data, never code. Every read is `torch.load(weights_only=True)`: torch's restricted unpickler
builds tensors and plain Python values only, so a planted file cannot run anything while it is read (a full
unpickle can call any function the file names). The only classes a checkpoint may name (`askexpert_class`,
LightningCLI's `hyper_parameters._class_path`) are askexpert's own LightningModules; anything else is refused
before it is imported. Lightning's own reads (`--ckpt_path`, resumes) go through `AtomicCheckpointIO`, which
uses `load_checkpoint` below.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from askexpert.errors import UserError
from askexpert.files.atomic import atomic_path

# Values of --ckpt_path that Lightning resolves itself rather than reading as a file name.
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")

# Globals a checkpoint may hold beyond torch's own weights-only set: none. Every kind of checkpoint askexpert has
# written (generalist, base, experts of every strategy with and without distillation, last.ckpt with optimizer,
# scheduler, loop and callback states, weights-only best.ckpt; revisions 278cf7a to today) holds tensors and plain
# values only: `torch.serialization.get_unsafe_globals_in_checkpoint` lists nothing for any of them. An entry is
# a reviewed decision; it would also have to be registered globally (`torch.serialization.add_safe_globals`),
# because LightningCLI reads `--ckpt_path`'s hyper-parameters with its own `torch.load(weights_only=True)`.
CHECKPOINT_GLOBALS: list = []


# The classes a checkpoint may name: askexpert's LightningModules, by their public path (what configs and so
# LightningCLI's `_class_path` say) and by their defining path (what `askexpert_class` records). Data, not an
# import of `askexpert.modules`: the modules read checkpoints through this file. tests/test_safe_loading.py checks
# it against `askexpert.modules.__all__`, so a new module cannot be forgotten here.
MODULE_CLASSES: dict[str, str] = {  # in the order of `askexpert.modules.__all__`, which the refusal lists
    "BaseModule": "askexpert.modules.base_model.BaseModule",
    "ClassifierModule": "askexpert.modules.classifier.ClassifierModule",
    "ExpertModule": "askexpert.modules.expert.ExpertModule",
    "GeneralistModule": "askexpert.modules.generalist.GeneralistModule",
}
ALLOWED_CLASS_PATHS: frozenset[str] = frozenset(
    path for name, defined in MODULE_CLASSES.items() for path in (f"askexpert.modules.{name}", defined)
)


def check_class_path(class_path: object, path: str) -> str:
    """`class_path` when it names one of askexpert's modules; refused in one line otherwise (never imported)."""
    if not isinstance(class_path, str) or class_path not in ALLOWED_CLASS_PATHS:
        raise UserError(
            f"checkpoint {path} names the class {class_path!r}, which is not an askexpert module "
            f"({', '.join(MODULE_CLASSES)}); refusing to load it"
        )
    return class_path


def _check_archive(path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is truncated or not a torch checkpoint (no valid zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
            names = archive.namelist()
    except Exception as err:  # damaged zip records fail in many ways (bad CRC, names that are not UTF-8, ...)
        raise UserError(f"checkpoint {path} is corrupt: {type(err).__name__}: {err}") from None
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise UserError(f"{path} is a zip archive but not a torch checkpoint (it holds no data.pkl)")
    if bad_member is not None:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch in {bad_member})")


def _unsafe_refusal(path: str) -> str:
    """Why a weights-only read refused `path`: the globals it names (found by reading the pickle's opcodes only)."""
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the opcodes themselves are malformed
        names = []
    what = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
    return (
        f"refusing checkpoint {path}: it holds Python objects that could run code when loaded{what}; askexpert "
        "checkpoints hold only tensors and plain values, so this file was not written by askexpert or was altered"
    )


def load_checkpoint(path: str, map_location: str | torch.device | Callable = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dictionary, after the integrity check, read without running anything from the file.

    `mmap`: leave the tensors in the file (cheap, for reading hyper-parameters or checking a file).
    """
    _check_archive(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # what torch's weights-only unpickler raises for anything it will not build
        raise UserError(_unsafe_refusal(path)) from None
    except Exception as err:  # a damaged file fails in many ways; all mean the same thing to a user
        raise UserError(f"cannot read checkpoint {path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict):
        raise UserError(f"{path} is not a Lightning checkpoint (its hyper_parameters are not a dictionary)")
    for class_path in (checkpoint.get("askexpert_class"), hparams.get("_class_path")):
        if class_path is not None:
            check_class_path(class_path, path)
    return checkpoint


def check_checkpoint_file(path: str) -> None:
    """Raise UserError unless `path` is a complete torch checkpoint that loads safely and names only our classes.

    Cheap: the tensors stay in the file (mmap)."""
    load_checkpoint(path, mmap=True)


def has_training_state(path: str) -> bool:
    """Whether a checkpoint holds optimizer state (so training can resume from it)."""
    return bool(load_checkpoint(path, mmap=True).get("optimizer_states"))


def strip_training_state(path: str) -> None:
    """Rewrite a checkpoint with weights, hyper-parameters and progress only (atomically)."""
    checkpoint = load_checkpoint(path)
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        checkpoint.pop(key, None)
    save_torch_file(checkpoint, path)  # a temporary file in the same folder, fsync, rename


def check_same_classes(model, datamodule, what: str) -> None:
    """Refuse a model trained on another class set than the data it is used with."""
    h = model.hparams
    names = h.get("class_names")
    if h.num_classes != datamodule.num_classes or (names and list(names) != datamodule.class_names):
        raise UserError(
            f"{what} was trained on {h.num_classes} classes, a different class set than the data "
            f"({datamodule.num_classes} classes)"
        )


class _WriteRecorder:
    """A file handle that remembers the first OSError of a write: torch's serializer turns it into a
    RuntimeError about its C++ zip writer, which says nothing about the file or a full disk."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._handle.flush()


def save_torch_file(obj: Any, path: str) -> None:
    """`torch.save(obj, path)` the way every file is written here (askexpert/files/atomic.py): into a temporary file
    in the same folder, fsynced, renamed. A failed write (a full disk) is an OSError naming `path`, and `path` is
    left as it was."""
    with atomic_path(path) as tmp:
        try:
            # a name of our own (not mkstemp: its files are private to the owner, checkpoints are not)
            with open(tmp, "xb") as handle:
                recorder = _WriteRecorder(handle)
                torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise OSError(recorder.error.errno, recorder.error.strerror, path) from None
        except OSError as err:  # flushing the handle's buffer when it closed
            if err.filename is not None or err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, path) from None


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor is finite, with one host sync for all of them."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True

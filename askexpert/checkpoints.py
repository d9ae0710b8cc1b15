"""Checking and loading checkpoint files, with one clear error for a missing, truncated or corrupt file.

Lightning and torch would fail deep inside unpickling with a message about zip records; a user who
passed the wrong file deserves to hear which file is broken. torch checkpoints are zip archives with a
CRC-32 per member, so integrity can be checked without unpickling anything.
"""

from __future__ import annotations

import importlib
import os
import zipfile

import torch

from askexpert.errors import UserError

# Values of --ckpt_path that Lightning resolves itself rather than reading as a file name.
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def check_checkpoint_file(path: str) -> None:
    """Raise UserError unless `path` is a complete, uncorrupted torch checkpoint archive."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is truncated or not a torch checkpoint (no valid zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"checkpoint {path} is corrupt: {err}") from None
    if bad_member is not None:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch in {bad_member})")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dictionary, after the integrity check."""
    check_checkpoint_file(path)
    try:
        # Lightning checkpoints hold hyper-parameters (plain Python objects), so not weights_only.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # unpickling errors have many types; all mean the same thing to a user
        raise UserError(f"cannot read checkpoint {path}: {err}") from None


def load_classifier(path: str, map_location: str | torch.device = "cpu"):
    """Rebuild the askexpert LightningModule saved in `path` (class recorded in the file), in eval mode."""
    checkpoint = load_checkpoint(path, map_location)
    class_path = checkpoint.get("askexpert_class")
    if not class_path:
        raise UserError(f"checkpoint {path} was not written by an askexpert module")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls.load_from_checkpoint(path, map_location=map_location)
    return model.eval()


def has_training_state(path: str) -> bool:
    """Whether a checkpoint holds optimizer state (so training can resume from it)."""
    return bool(load_checkpoint(path).get("optimizer_states"))


def strip_training_state(path: str) -> None:
    """Rewrite a checkpoint with weights, hyper-parameters and progress only (atomically)."""
    checkpoint = load_checkpoint(path)
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        checkpoint.pop(key, None)
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def check_same_classes(model, datamodule, what: str) -> None:
    """Refuse a model trained on another class set than the data it is used with."""
    h = model.hparams
    names = h.get("class_names")
    if h.num_classes != datamodule.num_classes or (names and list(names) != datamodule.class_names):
        raise UserError(
            f"{what} was trained on {h.num_classes} classes, a different class set than the data "
            f"({datamodule.num_classes} classes)"
        )

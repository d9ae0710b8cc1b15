"""Rebuilding a trained askexpert module from its checkpoint file alone: the one checkpoint reader that needs
class objects, so it lives with the classes (askexpert/files/checkpoints.py only names them, as data)."""

from __future__ import annotations

import importlib

import torch

from askexpert.errors import UserError
from askexpert.files.checkpoints import CHECKPOINT_GLOBALS, check_class_path, load_checkpoint


def module_class(class_path: object, path: str) -> type:
    """The askexpert module class `class_path` names, imported only once the allow-list accepted it."""
    module, _, name = check_class_path(class_path, path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_classifier(path: str, map_location: str | torch.device = "cpu"):
    """Rebuild the askexpert LightningModule saved in `path` (class recorded in the file), in eval mode."""
    checkpoint = load_checkpoint(path, mmap=True)
    class_path = checkpoint.get("askexpert_class")
    if not class_path:
        raise UserError(f"checkpoint {path} was not written by an askexpert module")
    cls = module_class(class_path, path)
    del checkpoint
    # Lightning reads the file again; weights_only explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn
    # it into a full unpickle, and Lightning builds `_class_path` only as an imported subclass of `cls`.
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        model = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return model.eval()

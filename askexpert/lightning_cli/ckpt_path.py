"""`--ckpt_path`: the checkpoint a run resumes from or evaluates, checked before anything reads it.

LightningCLI unpickles the checkpoint while it parses; a broken, weights-only or other-class-set file is said in
one line here first (the file's own checks: askexpert/files/checkpoints.py). Its saved hyper-parameters are
also what an evaluated expert's config is completed from (askexpert/lightning_cli/config.py).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from jsonargparse import Namespace
from lightning.fabric.utilities.data import AttributeDict

from askexpert.errors import UserError
from askexpert.files.checkpoints import (
    LIGHTNING_CKPT_ALIASES,
    check_checkpoint_file,
    check_same_classes,
    has_training_state,
    load_checkpoint,
)
from askexpert.runs.folder import checkpoint_dir, last_checkpoint
from datamodules.datamodule import ImageDataModule


def resolve_ckpt_path(config: Namespace, subcommand: str) -> None:
    """Check the checkpoint file a subcommand will read; `fit --ckpt_path last` with nothing (sound) to resume
    becomes a fresh run (`config.ckpt_path = None`)."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path == "last":
        found = _resolve_last(config, subcommand)
    elif ckpt_path and ckpt_path not in LIGHTNING_CKPT_ALIASES:
        check_checkpoint_file(ckpt_path)
        found = ckpt_path
    else:
        found = None
    if subcommand == "fit" and found and not has_training_state(found):
        raise UserError(
            f"{found} holds weights only (its run finished), so it cannot resume training; start a "
            "new run from it instead (an expert: --model.init base --model.base_path FILE)"
        )


def _resolve_last(config: Namespace, subcommand: str) -> str | None:
    """The run's last.ckpt, checked; None (and no checkpoint to resume) where `fit` finds none or a broken one."""
    found = last_checkpoint(config.trainer.default_root_dir)
    if found:
        try:
            check_checkpoint_file(found)
        except UserError as err:
            if subcommand != "fit":
                raise
            # left truncated by a crash or a full disk (before writes were atomic): train again from
            # the start rather than block the run; the first epoch's last.ckpt replaces it
            print(f"askexpert: {err}; not resuming from it, training starts again", file=sys.stderr)
            config.ckpt_path = None
            return None
        return found
    if subcommand != "fit":
        raise UserError(f"--ckpt_path last: no last.ckpt in {checkpoint_dir(config.trainer.default_root_dir)}")
    # nothing to resume yet (a requeued job's first start): a fresh run, with its initial weights
    config.ckpt_path = None
    return None


def checkpoint_hparams(ckpt_path: str | None, root: str) -> dict:
    """Hyper-parameters saved in the checkpoint an evaluation will load ({} when there is none yet)."""
    if ckpt_path == "last":
        ckpt_path = last_checkpoint(root)
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_ALIASES or not os.path.isfile(ckpt_path):
        return {}
    return dict(load_checkpoint(ckpt_path, mmap=True).get("hyper_parameters", {}))


def check_checkpoint_classes(config: Namespace, datamodule: ImageDataModule) -> None:
    """A checkpoint of another class set than the data: one line, not a size mismatch deep inside torch (the
    model is built with the data's class count, so only the checkpoint's own hyper-parameters can tell)."""
    root = config.trainer.default_root_dir
    ckpt_path = last_checkpoint(root) if config.get("ckpt_path") == "last" else config.get("ckpt_path")
    saved = checkpoint_hparams(ckpt_path, root)
    if saved.get("num_classes") is not None:
        check_same_classes(SimpleNamespace(hparams=AttributeDict(saved)), datamodule, f"checkpoint {ckpt_path}")
    if saved and saved.get("image_size", 32) != datamodule.hparams.image_size:
        raise UserError(
            f"checkpoint {ckpt_path} was trained on {saved.get('image_size', 32)} px images but --data.image_size is "
            f"{datamodule.hparams.image_size}"
        )

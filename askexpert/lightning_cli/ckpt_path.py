"""`--ckpt_path`: the checkpoint a run resumes from or evaluates, checked before anything reads it.

LightningCLI unpickles the checkpoint while it parses; a broken, weights-only or other-class-set file is said in
one line here first (the file's own checks: askexpert/files/checkpoints.py). Its saved hyper-parameters are
also what an evaluated expert's config is completed from (askexpert/lightning_cli/config.py), and what the built
model is checked against before a run starts (`check_checkpoint_fits`).
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


def check_checkpoint_fits(subcommand: str, config: Namespace, model, datamodule: ImageDataModule) -> None:
    """The checkpoint a run resumes or evaluates must hold the model this run built, said in one line naming both
    values (not a size mismatch deep inside torch, nor a run that quietly trains another model): the data's class
    set and image size, and the model's class, architecture, "other" output and expert subset; for a resumed `fit`
    also the optimizer and schedule settings, whose state the checkpoint restores.

    A resumed `fit` builds its model from its own settings, never the checkpoint's (`AskExpertCLI._parse_ckpt_path`),
    so a changed `--model.model_name` is refused here. An evaluation with a checkpoint file builds the model from the
    checkpoint's hyper-parameters (LightningCLI's way), so there this mostly guards `--ckpt_path last`."""
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
    if saved:
        check_same_model(saved, model, f"checkpoint {ckpt_path}", resuming=subcommand == "fit")


# the settings that decide what a model is: a checkpoint's weights belong to one value of each
ARCHITECTURE_KEYS = ("model_name", "img_size")
# what a resumed run takes from the checkpoint's optimizer and scheduler states: another value would be ignored (the
# rates and weight decay are restored) or fail to restore (other parameter groups, another scheduler)
OPTIMIZER_KEYS = ("lr", "head_lr", "layer_decay", "weight_decay", "warmup_epochs", "schedule", "min_lr_ratio")


def check_same_model(saved: dict, model, what: str, resuming: bool) -> None:
    """Refuse a model built with other architecture settings than the checkpoint's hyper-parameters (`saved`), and
    a resumed one (`resuming`) with other optimizer settings."""
    hint = "use the settings of the run that wrote it (e.g. its config.yaml), or a new run folder"
    saved_class = str(saved.get("_class_path") or "").rpartition(".")[2]
    built_class = type(model).__name__
    if saved_class and saved_class != built_class:
        raise UserError(f"{what} holds a {saved_class} but this run's model is a {built_class} (--model); {hint}")
    built = model.hparams
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != built.get(key):
            given = built.get(key)
            raise UserError(f"{what} holds a model with {key} {saved[key]!r} but --model.{key} is {given!r}; {hint}")
    for key in OPTIMIZER_KEYS if resuming else ():
        if key in saved and saved[key] != built.get(key):
            raise UserError(
                f"{what} continues a run with {key} {saved[key]!r} but --model.{key} is {built.get(key)!r}; a resumed "
                f"run keeps its optimizer and schedule: {hint}"
            )
    if bool(saved.get("other_output")) != bool(built.get("other_output")):
        has = lambda flag: "an 'other' output (dustbin)" if flag else "no 'other' output"  # noqa: E731
        raise UserError(
            f"{what} holds an expert with {has(saved.get('other_output'))} but this run's expert has "
            f"{has(built.get('other_output'))} (--specialization); {hint}"
        )
    if saved.get("subset") is not None and built.get("subset") is not None:
        if sorted(saved["subset"]) != sorted(built["subset"]):
            raise UserError(
                f"{what} holds expert {saved.get('expert_index')} of {len(saved['subset'])} classes but --partition "
                f"--expert_index {built.get('expert_index')} gives this run other classes ({len(built['subset'])}); "
                f"{hint}"
            )

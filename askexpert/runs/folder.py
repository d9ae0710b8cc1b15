"""One fixed folder per run: checkpoints, resolved config, metrics and the W&B run id live together.

A second launch with the same `--trainer.default_root_dir` and `--ckpt_path last` therefore finds the
last checkpoint, appends to the same metrics file, overwrites the same `config.yaml` and resumes the same
W&B run instead of starting a new version. How its files are written: askexpert/files/atomic.py; who may
write it: askexpert/runs/lock.py.
"""

from __future__ import annotations

import os
import secrets
import string

from askexpert.files.atomic import atomic_write_text

WANDB_ID_FILE = "wandb_id.txt"
CHECKPOINT_SUBDIR = "checkpoints"
EVALUATION_SUBDIR = "eval"
CSV_LOGGER = "askexpert.loggers.RunCSVLogger"
WANDB_LOGGERS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger")


def checkpoint_dir(root: str) -> str:
    return os.path.join(root, CHECKPOINT_SUBDIR)


def last_checkpoint(root: str) -> str | None:
    path = os.path.join(checkpoint_dir(root), "last.ckpt")
    return path if os.path.isfile(path) else None


def wandb_run_id(root: str, reuse: bool = True) -> tuple[str, bool]:
    """The run's W&B id from the run folder (when `reuse`), or a fresh one; the flag says whether it is new."""
    path = os.path.join(root, WANDB_ID_FILE)
    if reuse and os.path.isfile(path):
        with open(path) as handle:
            run_id = handle.read().strip()
        if run_id:
            return run_id, False
    # Same shape as W&B's own ids (8 lowercase letters and digits); no wandb import needed to make one.
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8)), True


def save_wandb_run_id(root: str, run_id: str) -> None:
    atomic_write_text(os.path.join(root, WANDB_ID_FILE), run_id + "\n")


def wandb_should_be_offline() -> bool:
    """Offline unless the user chose a mode (WANDB_MODE) or a sweep agent started this run."""
    return not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_SWEEP_ID")


def sweep_run() -> tuple[str, str] | None:
    """(sweep id, run id) when a W&B sweep agent started this process (it sets both variables), else None."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return (sweep_id, run_id) if sweep_id and run_id else None


def evaluation_dir(root: str) -> str:
    """Where `validate`, `test` and `predict` write by default: `<root>/eval`, never the run folder itself, whose
    config.yaml, hparams.yaml, metrics.csv and checkpoints belong to its training (a finished run stays as it was)."""
    return os.path.join(root, EVALUATION_SUBDIR)

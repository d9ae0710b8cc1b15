"""What every Trainer the CLI builds gets beyond its config: a current last.ckpt, the non-finite guard, saved
random states, a progress bar that does not wait for the GPU, and checkpoints written atomically; its hardware and
loop options checked (lightning_cli/trainer_options.py) and, inside a SLURM job, SLURM's tasks checked against its
devices x nodes before Lightning builds it (lightning_cli/slurm.py).

`AskExpertCLI._instantiate_trainer` calls `add_house_parts` just before Lightning builds the Trainer (and stays
the one method to patch for a probe that needs the built Trainer: tests/test_step_syncs.py, benchmarks/).
"""

from __future__ import annotations

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar

from askexpert.callbacks.guard import NonFiniteGuard
from askexpert.callbacks.progress import IntervalProgressBar
from askexpert.callbacks.rng import RandomStateCheckpoint
from askexpert.files.checkpoint_io import AtomicCheckpointIO
from askexpert.lightning_cli.slurm import check_slurm_tasks
from askexpert.lightning_cli.trainer_options import check_trainer_options
from askexpert.runs.folder import checkpoint_dir

DEFAULT_ROOT_DIR = "runs/default"


def add_house_parts(config: dict, callbacks: list) -> list[Callback]:
    """The callbacks the Trainer is built with (`config`'s own callbacks and plugins are completed in place)."""
    # Lightning refuses unknown accelerators, strategies and devices from inside Trainer.__init__ (a traceback),
    # and some loop options only when the first epoch divides by them
    check_trainer_options(config)
    # Lightning reads ranks from SLURM inside Trainer.__init__: a layout that cannot work is one line here instead
    check_slurm_tasks(config)
    # the specialization slot is empty (None) for generalists and base models
    callbacks = [c for c in callbacks if c is not None]
    # Always on: a run never trains on (or saves) after a non-finite loss (askexpert/callbacks/guard.py).
    callbacks += [NonFiniteGuard(), last_checkpoint_callback(config.get("default_root_dir") or DEFAULT_ROOT_DIR)]
    # First of every callback (Lightning keeps the order of non-checkpoint callbacks): a resumed run restores
    # the saved random states before anything else draws from them (askexpert/callbacks/rng.py).
    given_callbacks = config.get("callbacks")
    if given_callbacks is not None and not isinstance(given_callbacks, list):
        given_callbacks = [given_callbacks]
    config["callbacks"] = [RandomStateCheckpoint(), *(given_callbacks or [])]
    # A bar that reads metrics only at the logging interval: TQDM's default waits for the GPU every step
    # (askexpert/callbacks/progress.py). Lightning refuses a bar callback when the bar is switched off.
    given = [*callbacks, *(config.get("callbacks") or [])]
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        callbacks.append(IntervalProgressBar())
    # Checkpoints written to a temporary file, fsynced and renamed into place (askexpert/files/checkpoint_io.py).
    plugins = config.get("plugins") or []
    plugins = plugins if isinstance(plugins, list) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        config["plugins"] = [*plugins, AtomicCheckpointIO()]
    return callbacks


def last_checkpoint_callback(root: str) -> ModelCheckpoint:
    """`checkpoints/last.ckpt`, current after every epoch; `--ckpt_path last` finds it by name.

    Lightning 2.6 writes `save_last` only when the monitored checkpoint was also saved, so a run whose val/acc
    did not improve would resume from an older epoch: this second, unmonitored callback does not wait for it."""
    return ModelCheckpoint(
        dirpath=checkpoint_dir(root),
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )

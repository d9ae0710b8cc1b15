"""Everything about a run that can be wrong, checked once its objects are built and before it writes anything;
then the run folder's lock, held while it runs.

A missing file, a model that cannot take the data's image size, a checkpoint of another class set, an output
that cannot be written or an expert set up wrong is one line from `AskExpertCLI._run_subcommand` (before the
first epoch), never a half-written run folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_only

from askexpert.errors import UserError, check_output_path
from askexpert.lightning_cli.ckpt_path import check_checkpoint_fits
from askexpert.loggers import RunCSVLogger
from askexpert.models.registry import check_input_size
from askexpert.modules import ClassifierModule, ExpertModule
from askexpert.runs.folder import save_wandb_run_id
from askexpert.runs.lock import locked
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import Partition
from strategies import SpecializationStrategy


def prepare_weights(model: ClassifierModule, resume: bool) -> None:
    """A resumed run takes its weights from the checkpoint; any other run reads and checks its initial (e.g.
    pretrained) weights now, so a missing file or network fails in seconds."""
    if resume:
        model.resuming = True
    else:
        model.prepare_initial_weights()


def check_before_run(
    subcommand: str,
    config: Namespace,
    model: ClassifierModule,
    datamodule: ImageDataModule,
    trainer: Trainer,
    strategy: SpecializationStrategy | None,
) -> None:
    """Every check of a run whose data is loaded (`datamodule.setup()` done) and whose Trainer is built."""
    check_image_size(model, datamodule)
    check_checkpoint_fits(subcommand, config, model, datamodule)
    check_outputs(subcommand, config)
    if isinstance(model, ExpertModule):
        check_expert(subcommand, model, datamodule, trainer, strategy)


def check_image_size(model, datamodule) -> None:
    """The model must take the size the data gives it: say so before training, not deep inside timm.

    A model is built at `--data.image_size` (linked), so this fails for a checkpoint built at another size, or an
    architecture that cannot take the size at all (one forward pass of one image tells)."""
    size = datamodule.hparams.image_size
    built = model.hparams.get("image_size", 32)
    if built != size:
        raise UserError(
            f"model {model.hparams.model_name} was built for {built}x{built} images but --data.image_size is {size}"
        )
    check_input_size(model.net, model.hparams.model_name, size)


def check_outputs(subcommand: str, config: Namespace) -> None:
    """Outputs that cannot be written (a file as the run folder, a folder as the predictions CSV, no write
    permission), refused before the run starts instead of at its first write."""
    if not config.trainer.default_root_dir:  # "" would split a run between this folder and runs/default
        raise UserError("--trainer.default_root_dir is empty; give the run's folder")
    if subcommand == "fit":
        check_output_path(config.trainer.default_root_dir, "--trainer.default_root_dir", "folder")
    output = (config.get("prediction_writer") or {}).get("output")
    if subcommand == "predict" and output:
        check_output_path(output, "--prediction_writer.output", "file")


def check_expert(
    subcommand: str,
    model: ExpertModule,
    datamodule: ImageDataModule,
    trainer: Trainer,
    strategy: SpecializationStrategy | None,
) -> None:
    """Everything about an expert run that can be wrong: its partition's classes against the data's, one device,
    and a strategy that can train it."""
    partition_file = model.hparams.get("partition")
    if partition_file and os.path.isfile(partition_file):
        Partition.load(partition_file).check_classes(datamodule.class_names)
    if subcommand != "fit":
        return
    if trainer.world_size > 1:
        raise UserError(
            "an expert trains on one device; to train several experts at once use "
            "`python -m askexpert experts --devices ...` (one subprocess per GPU)"
        )
    if strategy is not None:
        strategy.validate(model, datamodule)


@contextlib.contextmanager
def run_folder_lock(
    subcommand: str, trainer: Trainer, resuming: bool, new_wandb_id: tuple[str, str] | None
) -> Iterator[None]:
    """One writer per run folder (askexpert/runs/lock.py), held by `fit`; evaluations only read it. DDP ranks
    other than 0 (started by rank 0, which holds the lock) write nothing. A new W&B run id is saved only once
    the folder is held."""
    with contextlib.ExitStack() as stack:
        if subcommand == "fit" and rank_zero_only.rank == 0:
            stack.enter_context(locked(trainer.default_root_dir))
            if resuming:  # metrics.csv drops the rows of epochs trained again
                for logger in trainer.loggers:
                    if isinstance(logger, RunCSVLogger):
                        logger.resuming = True
        if new_wandb_id:
            save_wandb_run_id(*new_wandb_id)
        yield

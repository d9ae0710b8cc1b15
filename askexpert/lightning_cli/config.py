"""The parsed config, rewritten before LightningCLI builds any class: where a run logs, where a sweep's run
lives, what an evaluation may write, and what an expert trains on.

Plain functions of the config Namespace (one subcommand's section), called in this order by
`AskExpertCLI.before_instantiate_classes` through `rewrite_config`.
"""

from __future__ import annotations

import importlib
import os

from jsonargparse import Namespace

import strategies
from askexpert.errors import UserError
from askexpert.lightning_cli.ckpt_path import checkpoint_hparams
from askexpert.modules import ExpertModule
from askexpert.runs.folder import (
    CSV_LOGGER,
    WANDB_LOGGERS,
    checkpoint_dir,
    evaluation_dir,
    wandb_run_id,
    wandb_should_be_offline,
)
from datamodules.partitions import Partition

# Subcommands that read a checkpoint and write only under `<root>/eval` (see `configure_evaluation`).
EVALUATION_COMMANDS = ("validate", "test", "predict")


def rewrite_config(config: Namespace, subcommand: str | None, sweep: tuple[str, str] | None) -> tuple[str, str] | None:
    """Apply every rewrite a subcommand's config gets; returns the (run folder, W&B id) to save once the run
    holds its folder, where a new W&B run id was drawn."""
    new_wandb_id = None
    # A fresh `fit` starts a new metrics.csv and W&B run; a resumed one continues them.
    fresh_fit = subcommand == "fit" and not config.get("ckpt_path")
    if subcommand == "fit" and sweep:
        configure_sweep_run(config, *sweep)
    if subcommand in EVALUATION_COMMANDS:
        configure_evaluation(config.trainer)
    else:
        new_wandb_id = configure_loggers(config.trainer, append_metrics=not fresh_fit, sweep=sweep)
    configure_expert(config, fitting=subcommand == "fit")
    if config.data.val_fraction == 0:  # nothing to validate on: keep the newest weights as "best"
        config.checkpoint.monitor = None
        config.trainer.limit_val_batches = 0
    return new_wandb_id


def _import_class(class_path: str | None) -> object:
    """The class a config names, or None where it names none that imports (jsonargparse reports that itself)."""
    if not class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def configure_expert(config: Namespace, fitting: bool) -> None:
    """Give an ExpertModule its subset (from --partition) and strategy; refuse expert options elsewhere."""
    model_class = _import_class(config.model.class_path)
    is_expert = isinstance(model_class, type) and issubclass(model_class, ExpertModule)
    if not is_expert:
        if config.get("partition") or config.get("specialization"):
            raise UserError(
                "--partition and --specialization train experts: use an expert config "
                "(model class askexpert.modules.ExpertModule, e.g. configs/expert_demo.yaml)"
            )
        return
    init_args = config.model.init_args
    # evaluating a checkpoint: its own subset and head width, unless the command line says otherwise
    saved = {} if fitting else checkpoint_hparams(config.get("ckpt_path"), config.trainer.default_root_dir)
    if config.get("partition"):
        partition = Partition.load(config.partition)
        init_args.subset = partition.classes_of(config.expert_index)
        init_args.expert_index = config.expert_index
        init_args.partition = config.partition
    elif saved.get("subset"):
        init_args.subset = list(saved["subset"])
        init_args.expert_index = saved.get("expert_index", 0)
        init_args.partition = saved.get("partition")
    elif not init_args.get("subset"):
        raise UserError("an expert needs its classes: --partition FILE --expert_index I")
    if fitting and config.get("specialization") is None:
        config.specialization = Namespace(class_path=strategies.class_path(strategies.DEFAULT_STRATEGY))
    if "other_output" in saved:  # the checkpoint's head width wins when evaluating it
        init_args.other_output = bool(saved["other_output"])
    elif config.get("specialization") is not None:
        strategy_class = _import_class(config.specialization.class_path)
        init_args.other_output = bool(getattr(strategy_class, "other_output", False))
    if config.checkpoint.monitor == "val/acc":  # an expert is judged on its own classes
        config.checkpoint.monitor = "val/subset_acc"


def configure_sweep_run(config: Namespace, sweep_id: str, run_id: str) -> None:
    """A W&B sweep agent's run: its own folder under the configured one (runs of a sweep share a config,
    so they would overwrite each other), and a W&B logger even if the config has none (the sweep reads
    its metric from W&B). The agent's run id and project reach the logger in `configure_loggers`."""
    root = os.path.join(config.trainer.default_root_dir, f"sweep-{sweep_id}", run_id)
    config.trainer.default_root_dir = root
    config.checkpoint.dirpath = checkpoint_dir(root)
    logger = config.trainer.logger
    loggers = [] if logger in (None, True) else logger if isinstance(logger, list) else [logger]
    if logger is False:
        loggers = []
    if not any(isinstance(x, Namespace) and x.get("class_path") in WANDB_LOGGERS for x in loggers):
        if not any(isinstance(x, Namespace) and x.get("class_path") == CSV_LOGGER for x in loggers):
            loggers.append(Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=root)))
        loggers.append(Namespace(class_path=WANDB_LOGGERS[0], init_args=Namespace(save_dir=root)))
    config.trainer.logger = loggers


def configure_evaluation(trainer: Namespace) -> None:
    """`validate`, `test` and `predict` leave the run they read as it was, even with its own config.yaml
    (`--config RUN/config.yaml`, which names RUN as the logger's folder): no config.yaml is saved (the CLI drops
    Lightning's SaveConfigCallback, which would replace the training's), no CSV logger runs (metrics.csv and
    hparams.yaml are the training's; the results JSON holds every metric), and any other logger writes under
    `<root>/eval` as a run of its own (a W&B logger does not continue the training's W&B run)."""
    out = evaluation_dir(trainer.default_root_dir)
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    kept = []
    for logger in loggers:
        if not isinstance(logger, Namespace) or logger.get("class_path") == CSV_LOGGER:
            continue  # True / None (the default CSV logger), False, or the CSV logger itself
        init = logger.get("init_args")
        if isinstance(init, Namespace):
            if "save_dir" in init:
                init.save_dir = out
            if logger.get("class_path") in WANDB_LOGGERS:
                init.id, init.version = None, None
                if wandb_should_be_offline():
                    init.offline = True
        kept.append(logger)
    trainer.logger = kept or False


def configure_loggers(
    trainer: Namespace, append_metrics: bool, sweep: tuple[str, str] | None
) -> tuple[str, str] | None:
    """Default to a CSV logger writing into the run folder; point W&B loggers at the run's fixed id (a sweep
    agent's run: the agent's id). Returns (run folder, id) where a new W&B id was drawn, for the caller to save
    once it holds the run folder."""
    root = trainer.default_root_dir
    new_wandb_id = None
    if trainer.logger is None or trainer.logger is True:
        trainer.logger = Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=root))
    if trainer.logger is False:
        return None
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        if not isinstance(logger, Namespace):
            continue
        if logger.get("class_path") == CSV_LOGGER:
            if logger.init_args.get("save_dir") in (None, "", "."):
                logger.init_args.save_dir = root
            logger.init_args.append = append_metrics
        if logger.get("class_path") not in WANDB_LOGGERS:
            continue
        init = logger.init_args
        if init.get("save_dir") in (None, "", "."):  # WandbLogger's own default is "."
            init.save_dir = root
        if sweep:  # the agent created the run (id and project in the environment): log into it
            init.id = sweep[1]
            init.project = os.environ.get("WANDB_PROJECT") or init.get("project")
        elif not init.get("id") and not init.get("version"):
            run_id, new = wandb_run_id(root, reuse=append_metrics)
            init.id = run_id
            if new:
                new_wandb_id = (root, run_id)
        if wandb_should_be_offline():
            init.offline = True
            init.log_model = False  # W&B cannot upload checkpoints offline
    return new_wandb_id

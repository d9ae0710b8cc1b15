"""`AskExpertCLI`: the LightningCLI of `fit`, `validate`, `test` and `predict`.

Only LightningCLI's hooks live here, each calling the module that does the job: the parser
(askexpert/lightning_cli/parser.py), the checkpoint check (ckpt_path.py), the config rewrites (config.py), the
Trainer's house callbacks (trainer.py), the checks and lock around a run (preflight.py) and the results JSON
(report.py).
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from askexpert.callbacks import AtomicSaveConfigCallback
from askexpert.files.checkpoints import strip_training_state
from askexpert.lightning_cli.ckpt_path import resolve_ckpt_path
from askexpert.lightning_cli.config import EVALUATION_COMMANDS, rewrite_config
from askexpert.lightning_cli.parser import (
    AskExpertArgumentParser,
    add_askexpert_arguments,
    map_specialization_names,
    refuse_model_settings_of_data,
)
from askexpert.lightning_cli.preflight import check_before_run, prepare_weights, run_folder_lock
from askexpert.lightning_cli.report import report_results
from askexpert.lightning_cli.trainer import DEFAULT_ROOT_DIR, add_house_parts
from askexpert.lightning_cli.trainer_options import lightning_hardware_refusals
from askexpert.modules import ClassifierModule, ExpertModule
from askexpert.runs.folder import last_checkpoint, sweep_run
from datamodules.datamodule import ImageDataModule


class AskExpertCLI(LightningCLI):
    """LightningCLI with askexpert's defaults: fixed run folders, linked data/model sizes, clear errors."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._new_wandb_id: tuple[str, str] | None = None
        # only the process's own `fit` is a sweep run: not the stages a pipeline or ablation runs in-process
        self._sweep = sweep_run() if args is None else None
        super().__init__(
            model_class=ClassifierModule,
            subclass_mode_model=True,
            datamodule_class=ImageDataModule,
            save_config_callback=AtomicSaveConfigCallback,  # config.yaml written atomically, like every file
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own config.yaml
            trainer_defaults={"default_root_dir": DEFAULT_ROOT_DIR, "log_every_n_steps": 10},
            seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf+"},  # ${...} interpolation across all --config files
            parser_class=AskExpertArgumentParser,
            auto_configure_optimizers=False,  # modules configure their own AdamW + schedule
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_askexpert_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        refuse_model_settings_of_data(self.config[subcommand] if subcommand else self.config)

    # -- before anything is built ------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint file before LightningCLI unpickles it (a broken file gets one clear line).

        LightningCLI would also replace the model's settings with the checkpoint's: right for an evaluation (the
        checkpoint is the model), but a resumed `fit` keeps its own, so a changed `--model.model_name` is refused
        (ckpt_path.check_checkpoint_fits) instead of silently training the checkpoint's model, and a resume from a
        file behaves as one from `--ckpt_path last`."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            resolve_ckpt_path(self.config[subcommand], subcommand)
        if subcommand != "fit":
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in EVALUATION_COMMANDS:  # an evaluation saves no config.yaml (config.configure_evaluation)
            self.save_config_callback = None
        self._new_wandb_id = rewrite_config(config, self.subcommand, self._sweep)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        # the one place the Trainer is built: tests and benchmarks patch this method to add a probe callback
        callbacks = add_house_parts(config, callbacks)
        with lightning_hardware_refusals():
            return super()._instantiate_trainer(config, callbacks)

    # -- running -----------------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        config = self.config[subcommand]
        expert = isinstance(self.model, ExpertModule)
        if not expert and (subcommand == "fit" or not config.get("ckpt_path")):
            # `validate`/`test`/`predict` without a checkpoint evaluate the initial (pretrained) model itself
            prepare_weights(self.model, resume=bool(config.get("ckpt_path")))
        # Load and check all data before the run writes anything into its folder.
        self.datamodule.prepare_data()
        self.datamodule.setup()
        strategy = self.config_init[subcommand].get("specialization")  # the built SpecializationStrategy, if any
        check_before_run(subcommand, config, self.model, self.datamodule, self.trainer, strategy)
        if expert and subcommand == "fit":
            prepare_weights(self.model, resume=bool(config.get("ckpt_path")))
        resuming = subcommand == "fit" and bool(config.get("ckpt_path"))
        with run_folder_lock(subcommand, self.trainer, resuming, self._new_wandb_id):
            super()._run_subcommand(subcommand)

    def after_fit(self) -> None:
        # A finished expert keeps weights only in last.ckpt too: N experts x optimizer state adds up on disk.
        if isinstance(self.model, ExpertModule) and not self.trainer.interrupted:
            found = last_checkpoint(self.trainer.default_root_dir)
            if found:
                strip_training_state(found)

    def after_validate(self) -> None:
        report_results("val", self.trainer, self.model, self.datamodule)

    def after_test(self) -> None:
        report_results("test", self.trainer, self.model, self.datamodule)


def run_lightning_command(argv: list[str], from_sys_argv: bool = False) -> AskExpertCLI:
    """`fit`, `validate`, `test` or `predict` (`argv[0]`) with its arguments, as `python -m askexpert` runs it: a
    strategy's short name (`--specialization progressive`) becomes its class path first. The dispatcher and the
    pipeline's in-process stages (and their `--print_config` resolution) all come through here.
    `from_sys_argv`: the arguments are the process's own (LightningCLI warns when given arguments while
    `sys.argv` holds others)."""
    quiet_repeated_notices()
    mapped = map_specialization_names(argv)
    if from_sys_argv:
        sys.argv[1:] = mapped
        return AskExpertCLI(args=None)
    with warnings.catch_warnings():  # in-process on purpose (a pipeline's stages, `experts`): not sys.argv's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return AskExpertCLI(args=mapped)


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_repeated_notices() -> None:
    """What every fit would print again and again without telling the user anything about their run: Lightning's
    advert for its cloud logger (once per Trainer) and a deprecation inside Lightning's own pytree helper (once
    per fit with this torch). Installed once per process."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in logger.filters):
        logger.addFilter(_NoAdvert())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

"""`python -m askexpert`: one entry point for every command.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands (built from the Trainer's methods).
Commands that are not a Trainer method (later: `pipeline`, `evaluate`, `ablate`, `profile`, `route`) register
in `EXTRA_COMMANDS` with their own jsonargparse parser; this module's dispatcher hands each its arguments.
`main()` turns a `UserError` into one line on stderr and exit status 2 (3 for a diverged training run).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from jsonargparse import Namespace, set_parsing_settings
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.data import AttributeDict
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

import strategies
from askexpert.callbacks import AtomicSaveConfigCallback, PredictionCSVWriter, evaluation_dir
from askexpert.callbacks.guard import NonFiniteGuard
from askexpert.callbacks.progress import IntervalProgressBar
from askexpert.callbacks.rng import RandomStateCheckpoint
from askexpert.errors import (
    UserError,
    check_output_path,
    one_line_for_user,
    one_line_parse_error,
)
from askexpert.files.atomic import atomic_write_text
from askexpert.files.checkpoint_io import AtomicCheckpointIO
from askexpert.files.checkpoints import (
    LIGHTNING_CKPT_ALIASES,
    check_checkpoint_file,
    check_same_classes,
    has_training_state,
    load_checkpoint,
    strip_training_state,
)
from askexpert.loggers import RunCSVLogger
from askexpert.modules import ClassifierModule, ExpertModule
from askexpert.modules.classifier import check_input_size
from askexpert.runs.folder import (
    CSV_LOGGER,
    WANDB_LOGGERS,
    checkpoint_dir,
    last_checkpoint,
    save_wandb_run_id,
    sweep_run,
    wandb_run_id,
    wandb_should_be_offline,
)
from askexpert.runs.lock import locked
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import Partition
from strategies import SpecializationStrategy

LIGHTNING_COMMANDS = {
    "fit": "train a model (generalist, base model or expert) from a config",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write a checkpoint's predictions on the test split to CSV",
}


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], object]


def _lazy(module: str) -> Callable[[list[str]], object]:
    """Import a command's module only when it runs (keeps `--help` and the other commands fast)."""
    return lambda argv: importlib.import_module(module).run(argv)


# Commands that are not Trainer methods, each with its own parser in `askexpert.commands`.
EXTRA_COMMANDS: dict[str, Command] = {
    "partition": Command(
        "split the classes into expert subsets (JSON artefact)", _lazy("askexpert.commands.partition")
    ),
    "experts": Command(
        "train every expert of a partition (one fit each, one GPU each)", _lazy("askexpert.commands.experts")
    ),
    "pipeline": Command(
        "generalist -> base -> partition -> experts -> evaluation report, in one run folder",
        _lazy("askexpert.commands.pipeline"),
    ),
    "evaluate": Command(
        "re-evaluate a pipeline run (another gate, budget or device profile) from its cached logits",
        _lazy("askexpert.commands.evaluate"),
    ),
    "ablate": Command(
        "a grid of pipeline settings x seeds, sharing common stages, to results.csv/.md",
        _lazy("askexpert.commands.ablate"),
    ),
    "route": Command("classify a folder of images with a trained system, to CSV", _lazy("askexpert.commands.route")),
    "profile": Command(
        "time each model on this machine and write a device profile", _lazy("askexpert.commands.profile")
    ),
    "export": Command(
        "a finished run's generalist and experts as verified ONNX files + manifest", _lazy("askexpert.commands.export")
    ),
    "serve": Command("serve an export's experts over HTTP", _lazy("askexpert.commands.serve")),
    "edge": Command(
        "the edge side: generalist here, unsure images offloaded to a server, to CSV", _lazy("askexpert.commands.edge")
    ),
}

DEFAULT_ROOT_DIR = "runs/default"
# Subcommands that read a checkpoint and write only under `<root>/eval` (see `_configure_evaluation`).
EVALUATION_COMMANDS = ("validate", "test", "predict")

# LightningCLI nests every config under its subcommand (`fit.trainer...`); with this setting a config file
# can still write `${trainer.default_root_dir}` and mean the key of its own subcommand.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class AskExpertArgumentParser(LightningArgumentParser):
    """Reports a bad argument as one short error (not the full usage), and lets UserErrors through."""

    def error(self, message: str, ex: Exception | None = None):
        if 'key "trainer.precision"' in message:
            raise UserError(f"--trainer.precision must be one of: {', '.join(precision_choices())}") from None
        if not self.exit_on_error:  # a parser jsonargparse made for a class inside an option: its caller reports
            raise one_line_parse_error(message, self.prog, ex, nested=True) from None
        command = self.prog.split()[-1]  # "__main__.py [options] fit" for a subcommand's parser
        prog = f"python -m askexpert {command}" if command in LIGHTNING_COMMANDS else "python -m askexpert"
        raise one_line_parse_error(message, prog, ex) from None


def precision_choices() -> list[str]:
    """The precision names Lightning accepts (from its own type), e.g. 32-true, bf16-mixed."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    return [str(v) for a in typing.get_args(_PRECISION_INPUT_STR) for v in (typing.get_args(a) or (a,))]


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
        parser.set_defaults({"model": {"class_path": "askexpert.modules.GeneralistModule"}})
        # Always-present callback slots: `trainer.callbacks` lists are replaced, not merged, across configs.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": False,  # last.ckpt has its own callback, see `_instantiate_trainer`
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.set_defaults({"checkpoint.save_weights_only": True})  # best.ckpt: weights only; last.ckpt resumes
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
        # Experts: which classes (from a partition file) and how to specialise (a registered strategy).
        parser.add_argument("--partition", type=str | None, default=None, help="partition JSON (experts only)")
        parser.add_argument("--expert_index", type=int, default=0, help="which expert of the partition to train")
        parser.add_lightning_class_args(SpecializationStrategy, "specialization", subclass_mode=True, required=False)
        for key in ("num_classes", "class_to_superclass", "superclass_names", "class_names", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    # -- before anything is built ------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint file before LightningCLI unpickles it (a broken file gets one clear line)."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            ckpt_path = config.get("ckpt_path")
            if ckpt_path == "last":
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
                        config.ckpt_path = found = None
                elif subcommand != "fit":
                    raise UserError(
                        f"--ckpt_path last: no last.ckpt in {checkpoint_dir(config.trainer.default_root_dir)}"
                    )
                else:  # nothing to resume yet (a requeued job's first start): a fresh run, with its initial weights
                    config.ckpt_path = None
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
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # A fresh `fit` starts a new metrics.csv and W&B run; a resumed one continues them.
        fresh_fit = self.subcommand == "fit" and not config.get("ckpt_path")
        if self.subcommand == "fit" and self._sweep:
            self._configure_sweep_run(config, *self._sweep)
        if self.subcommand in EVALUATION_COMMANDS:
            self._configure_evaluation(config.trainer)
        else:
            self._configure_loggers(config.trainer, append_metrics=not fresh_fit)
        self._configure_expert(config)
        if config.data.val_fraction == 0:  # nothing to validate on: keep the newest weights as "best"
            config.checkpoint.monitor = None
            config.trainer.limit_val_batches = 0

    def _configure_expert(self, config: Namespace) -> None:
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
        fitting = self.subcommand == "fit"
        # evaluating a checkpoint: its own subset and head width, unless the command line says otherwise
        saved = {} if fitting else _checkpoint_hparams(config.get("ckpt_path"), config.trainer.default_root_dir)
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

    @staticmethod
    def _configure_sweep_run(config: Namespace, sweep_id: str, run_id: str) -> None:
        """A W&B sweep agent's run: its own folder under the configured one (runs of a sweep share a config,
        so they would overwrite each other), and a W&B logger even if the config has none (the sweep reads
        its metric from W&B). The agent's run id and project reach the logger in `_configure_loggers`."""
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

    def _configure_evaluation(self, trainer: Namespace) -> None:
        """`validate`, `test` and `predict` leave the run they read as it was, even with its own config.yaml
        (`--config RUN/config.yaml`, which names RUN as the logger's folder): no config.yaml is saved (Lightning's
        SaveConfigCallback would replace the training's), no CSV logger runs (metrics.csv and hparams.yaml are the
        training's; the results JSON holds every metric), and any other logger writes under `<root>/eval` as a
        run of its own (a W&B logger does not continue the training's W&B run)."""
        self.save_config_callback = None
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

    def _configure_loggers(self, trainer: Namespace, append_metrics: bool) -> None:
        """Default to a CSV logger writing into the run folder; point W&B loggers at the run's fixed id."""
        root = trainer.default_root_dir
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=root))
        if trainer.logger is False:
            return
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
            if self._sweep:  # the agent created the run (id and project in the environment): log into it
                init.id = self._sweep[1]
                init.project = os.environ.get("WANDB_PROJECT") or init.get("project")
            elif not init.get("id") and not init.get("version"):
                run_id, new = wandb_run_id(root, reuse=append_metrics)
                init.id = run_id
                if new:
                    self._new_wandb_id = (root, run_id)
            if wandb_should_be_offline():
                init.offline = True
                init.log_model = False  # W&B cannot upload checkpoints offline

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        # Lightning 2.6 writes `save_last` only when the monitored checkpoint was also saved, so a run whose
        # val/acc did not improve would resume from an older epoch. A second, unmonitored callback keeps
        # `checkpoints/last.ckpt` current after every epoch; `--ckpt_path last` finds it by name.
        last = ModelCheckpoint(
            dirpath=checkpoint_dir(config.get("default_root_dir") or DEFAULT_ROOT_DIR),
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        )
        # the specialization slot is empty (None) for generalists and base models
        callbacks = [c for c in callbacks if c is not None]
        # Always on: a run never trains on (or saves) after a non-finite loss (askexpert/callbacks/guard.py).
        callbacks += [NonFiniteGuard(), last]
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
        return super()._instantiate_trainer(config, callbacks)

    # -- running -----------------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        if not isinstance(self.model, ExpertModule):
            if subcommand == "fit" and self.config[subcommand].get("ckpt_path"):
                self.model.resuming = True
            elif not self.config[subcommand].get("ckpt_path"):
                # pretrained weights, read and checked first (a missing file or network fails in seconds); also
                # what `validate`/`test`/`predict` without a checkpoint evaluate: the pretrained model itself
                self.model.prepare_initial_weights()
        # Load and check all data before the run writes anything into its folder.
        self.datamodule.prepare_data()
        self.datamodule.setup()
        check_image_size(self.model, self.datamodule)
        check_checkpoint_classes(self.config[subcommand], self.datamodule)
        check_outputs(subcommand, self.config[subcommand])
        if isinstance(self.model, ExpertModule):
            self._check_expert(subcommand)
        with contextlib.ExitStack() as stack:
            # One writer per run folder (askexpert/runs/lock.py); evaluations only read it. DDP ranks other than 0
            # (started by rank 0, which holds the lock) write nothing.
            if subcommand == "fit" and rank_zero_only.rank == 0:
                stack.enter_context(locked(self.trainer.default_root_dir))
                if self.config[subcommand].get("ckpt_path"):  # metrics.csv drops the rows of epochs trained again
                    for logger in self.trainer.loggers:
                        if isinstance(logger, RunCSVLogger):
                            logger.resuming = True
            if self._new_wandb_id:
                save_wandb_run_id(*self._new_wandb_id)
            super()._run_subcommand(subcommand)

    def _check_expert(self, subcommand: str) -> None:
        """Everything about an expert run that can be wrong, checked before the run writes anything."""
        partition_file = self.model.hparams.get("partition")
        if partition_file and os.path.isfile(partition_file):
            Partition.load(partition_file).check_classes(self.datamodule.class_names)
        if subcommand != "fit":
            return
        if self.trainer.world_size > 1:
            raise UserError(
                "an expert trains on one device; to train several experts at once use "
                "`python -m askexpert experts --devices ...` (one subprocess per GPU)"
            )
        strategy = self.config_init[subcommand].get("specialization")
        if strategy is not None:
            strategy.validate(self.model, self.datamodule)
        if self.config[subcommand].get("ckpt_path"):
            self.model.resuming = True
        else:
            self.model.prepare_initial_weights()

    def after_fit(self) -> None:
        # A finished expert keeps weights only in last.ckpt too: N experts x optimizer state adds up on disk.
        if isinstance(self.model, ExpertModule) and not self.trainer.interrupted:
            found = last_checkpoint(self.trainer.default_root_dir)
            if found:
                strip_training_state(found)

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        """Print the headline metric (labelled stand-in where it is) and save all metrics as JSON."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        data = self.datamodule.describe()
        result = {"stage": stage, "metrics": metrics, "data": data, "ckpt_path": self.trainer.ckpt_path}
        path = os.path.join(evaluation_dir(self.trainer.default_root_dir), f"{stage}_results.json")
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        label = "STAND-IN synthetic data, not CIFAR-100" if data["stand_in"] else f"{data['source']} data"
        acc = metrics.get(f"{stage}/acc")
        if acc is not None:
            name = type(self.model).__name__
            line = f"\n{name} {stage} accuracy: {100 * acc:.2f} % on {data[f'{stage}_size']} images"
            subset_acc = metrics.get(f"{stage}/subset_acc")
            if subset_acc is not None:
                line += f", {100 * subset_acc:.2f} % on the images of its {len(self.model.hparams.subset)} classes"
            print(f"{line} ({label})")


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


def _import_class(class_path: str | None) -> object:
    if not class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_checkpoint_classes(config: Namespace, datamodule: ImageDataModule) -> None:
    """A checkpoint of another class set than the data: one line, not a size mismatch deep inside torch (the
    model is built with the data's class count, so only the checkpoint's own hyper-parameters can tell)."""
    root = config.trainer.default_root_dir
    ckpt_path = last_checkpoint(root) if config.get("ckpt_path") == "last" else config.get("ckpt_path")
    saved = _checkpoint_hparams(ckpt_path, root)
    if saved.get("num_classes") is not None:
        check_same_classes(SimpleNamespace(hparams=AttributeDict(saved)), datamodule, f"checkpoint {ckpt_path}")
    if saved and saved.get("image_size", 32) != datamodule.hparams.image_size:
        raise UserError(
            f"checkpoint {ckpt_path} was trained on {saved.get('image_size', 32)} px images but --data.image_size is "
            f"{datamodule.hparams.image_size}"
        )


def check_outputs(subcommand: str, config: Namespace) -> None:
    """Outputs that cannot be written (a file as the run folder, a folder as the predictions CSV, no write
    permission), refused before the run starts instead of at its first write."""
    if subcommand == "fit":
        check_output_path(config.trainer.default_root_dir, "--trainer.default_root_dir", "folder")
    output = (config.get("prediction_writer") or {}).get("output")
    if subcommand == "predict" and output:
        check_output_path(output, "--prediction_writer.output", "file")


def _checkpoint_hparams(ckpt_path: str | None, root: str) -> dict:
    """Hyper-parameters saved in the checkpoint an evaluation will load ({} when there is none yet)."""
    if ckpt_path == "last":
        ckpt_path = last_checkpoint(root)
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_ALIASES or not os.path.isfile(ckpt_path):
        return {}
    return dict(load_checkpoint(ckpt_path, mmap=True).get("hyper_parameters", {}))


def map_specialization_names(argv: list[str]) -> list[str]:
    """`--specialization NAME` -> the registered class path, before jsonargparse sees it."""
    mapped = list(argv)
    for i, arg in enumerate(mapped):
        if arg == "--specialization" and i + 1 < len(mapped):
            value, index = mapped[i + 1], i + 1
        elif arg.startswith("--specialization="):
            value, index = arg.split("=", 1)[1], i
        else:
            continue
        if "." in value or value.startswith(("{", "[")):  # already a class path or a dict
            continue
        path = strategies.class_path(value)
        mapped[index] = path if index != i else f"--specialization={path}"
    return mapped


def print_overview() -> None:
    print("usage: python -m askexpert COMMAND [--config FILE ...] [options]\n")
    print("commands:")
    for name, text in {**LIGHTNING_COMMANDS, **{k: c.help for k, c in EXTRA_COMMANDS.items()}}.items():
        print(f"  {name:<10} {text}")
    print(
        "\n`python -m askexpert COMMAND --help` lists a command's options; `--print_config` shows the resolved config."
    )


def cli_main(args: list[str] | None = None):
    """Dispatch to a command; returns the LightningCLI (or the command's result) for tests."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return None
    command = argv[0]
    if command in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[command].run(argv[1:])
    if command not in LIGHTNING_COMMANDS:
        known = ", ".join([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])
        raise UserError(f"unknown command {command!r}; commands: {known}")
    mapped = map_specialization_names(argv)
    if args is None:  # LightningCLI warns when given args while sys.argv holds others: run from sys.argv
        sys.argv[1:] = mapped
        return AskExpertCLI(args=None)
    return AskExpertCLI(args=mapped)


def main() -> None:
    try:
        cli_main()
    except Exception as err:
        found = one_line_for_user(err)
        if found is None and isinstance(err, MisconfigurationException):
            found = (str(err).strip().splitlines()[0], 2)  # Lightning's word for a setting it refuses (`max_epochs -5`)
        if found is None:
            raise
        print(f"askexpert: error: {found[0]}", file=sys.stderr)
        sys.exit(found[1])

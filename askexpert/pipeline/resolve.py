"""A `fit` resolved in this process without training, so a typo or a bad value in the last stage fails before the
first one trains.

`print_config` is the one in-process `--print_config`: the pipeline plans every stage with it and the `experts`
command checks its arguments with it once, instead of once per expert process. `resolve_fit` also builds the
stage's model, data and trainer (not run), which catches bad values the parser accepts (a negative lr).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings

import yaml

from askexpert.errors import UserError, find_user_error
from askexpert.lightning_cli.cli import AskExpertCLI, run_lightning_command
from askexpert.lightning_cli.parser import map_specialization_names
from askexpert.lightning_cli.preflight import check_image_size

# A dry run checks a GPU config on any machine: same model and data, a plain one-device CPU trainer.
CPU_TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]
# An expert's partition does not exist before the pipeline builds it: it is built with a stand-in subset.
STAND_IN_EXPERT = ["--partition=null", "--model.init_args.subset=[0]"]


@contextlib.contextmanager
def quiet():
    """No stdout, Lightning info lines or warnings while a stage is only checked (not run)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def print_config(
    fit_args: list[str], invalid: str = "the arguments for `fit` are not valid (exit status {code})"
) -> dict:
    """The config `fit_args` (`["fit", ...]`) resolve to, as `--print_config` shows it; nothing runs or is
    written. A bad argument raises the parser's UserError; a parser that exits instead raises `invalid` (each
    caller keeps the words its users have always seen)."""
    buffer = io.StringIO()
    with quiet(), contextlib.redirect_stdout(buffer):
        try:
            run_lightning_command([*fit_args, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise UserError(invalid.format(code=exit_.code)) from None
    return yaml.safe_load(buffer.getvalue()) or {}


def resolve_fit(args: list[str], what: str, cpu_trainer: bool = False) -> dict:
    """A stage's resolved config (`print_config`, without `ckpt_path`: a resumed stage is the same stage), after
    building its model, data and trainer; raises UserError, naming the stage `what`, for bad arguments or values.
    `cpu_trainer`: build the trainer on the CPU (dry runs)."""
    try:
        config = print_config(args, invalid="its arguments are not valid")
        config.pop("ckpt_path", None)
        with quiet():
            _instantiate(instantiation_arguments(args, cpu_trainer))
    except Exception as err:
        found = find_user_error(err)
        if found is None:
            raise
        # the parser that failed may be a nested one named after the script: point at `fit --help` instead
        text = re.sub(
            r"\(see `python -m askexpert [^`]*--help`\)", "(see `python -m askexpert fit --help`)", str(found)
        )
        raise UserError(f"stage {what}: {text}") from None
    return config


def instantiation_arguments(fit_args: list[str], cpu_trainer: bool) -> list[str]:
    """A stage's `fit` arguments as LightningCLI(run=False) takes them to build the stage: without the `fit`
    subcommand (without subcommands it takes fit's options directly); an expert with a stand-in subset; a dry run
    with a plain CPU trainer. jsonargparse lets a later option replace an earlier one, so both are appended."""
    args = fit_args[1:]
    if "--partition" in args:
        args += STAND_IN_EXPERT
    return [*args, *CPU_TRAINER] if cpu_trainer else args


def _instantiate(args: list[str]) -> None:
    """Build the stage's model, data and trainer without running them, so a bad value (a negative lr, an
    unknown model) fails now rather than after the stages before it trained."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        cli = AskExpertCLI(args=map_specialization_names(args), run=False)
    except MisconfigurationException as err:  # e.g. a GPU trainer on a machine without one
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{reason} (`--dry_run true` checks a config without building its trainer)") from None
    check_image_size(cli.model, cli.datamodule)
    h = cli.model.hparams
    if h.get("pretrained_path") and h.get("init", "pretrained") == "pretrained":
        # a weights file that does not fit fails now, not after the stages before it trained
        from askexpert.models.pretrained import load_file_weights

        load_file_weights(cli.model.net, h.model_name, h.pretrained_path, cli.model.num_outputs)


def resolve_fit_cached(args: list[str], what: str, root: str, cache: dict | None, cpu_trainer: bool = False) -> dict:
    """`resolve_fit`, remembered in `cache` by the arguments with the run folder's path (`root`) left out: the
    cells of an ablation differ from each other in their folder, and resolving costs a second or two each."""
    if cache is None:
        return resolve_fit(args, what, cpu_trainer)
    placeholder = json.dumps(root)[1:-1]
    key = json.dumps([args, cpu_trainer]).replace(placeholder, "$OUT")
    if key not in cache:
        cache[key] = json.dumps(resolve_fit(args, what, cpu_trainer)).replace(placeholder, "$OUT")
    return json.loads(cache[key].replace("$OUT", placeholder))

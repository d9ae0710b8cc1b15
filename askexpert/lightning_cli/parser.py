"""What the command line of `fit`, `validate`, `test` and `predict` accepts, and how it refuses the rest.

The subcommands (a Trainer method each), the options askexpert adds to LightningCLI's (always-present callback
slots, the expert options, data sizes linked into the model), one-line errors instead of usage, and the
`--specialization NAME` shorthand, mapped to a class path before jsonargparse sees it.
"""

from __future__ import annotations

import inspect

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser

import strategies
from askexpert.callbacks import PredictionCSVWriter
from askexpert.errors import UserError, one_line_parse_error, undecodable_config
from askexpert.lightning_cli.commands import LIGHTNING_COMMANDS
from askexpert.modules import ClassifierModule
from askexpert.runs.folder import checkpoint_dir
from strategies import SpecializationStrategy

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

    def parse_args(self, *args, **kwargs):
        try:
            return super().parse_args(*args, **kwargs)
        except UnicodeDecodeError as err:  # a config file that is not text: jsonargparse lets the error out
            raise undecodable_config(err) from None


def precision_choices() -> list[str]:
    """The precision names Lightning accepts (from its own type), e.g. 32-true, bf16-mixed."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    return [str(v) for a in typing.get_args(_PRECISION_INPUT_STR) for v in (typing.get_args(a) or (a,))]


# The model settings the data decides (linked when the classes are built, see `add_askexpert_arguments`); a value
# given for one is replaced by the data's without a word, so it is refused instead (`refuse_model_settings_of_data`).
LINKED_FROM_DATA = ("num_classes", "class_to_superclass", "superclass_names", "class_names", "image_size")


def refuse_model_settings_of_data(config: Namespace) -> None:
    """Refuse `--model.image_size`, `--model.num_classes`, ... given on the command line or in a --config file (the
    data sets them). Until the link applies, the parsed config holds the module's own default where nothing was
    given, so a value other than that default was given by the user (the default itself cannot be told apart, and
    is what the data gives in the common case)."""
    defaults = inspect.signature(ClassifierModule.__init__).parameters
    init_args = (config.get("model") or Namespace()).get("init_args")
    for key in LINKED_FROM_DATA if isinstance(init_args, Namespace) else ():
        if key in init_args and init_args[key] != defaults[key].default:
            source = "--data.image_size" if key == "image_size" else "the data's classes (--data.source, --data.root)"
            raise UserError(f"--model.{key} is set from {source}, not by the model: leave it out")


def add_askexpert_arguments(parser: LightningArgumentParser) -> None:
    """The options askexpert adds to every subcommand's parser."""
    parser.set_defaults({"model": {"class_path": "askexpert.modules.GeneralistModule"}})
    # Always-present callback slots: `trainer.callbacks` lists are replaced, not merged, across configs.
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults(
        {
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best",
            "checkpoint.save_last": False,  # last.ckpt has its own callback, see askexpert/lightning_cli/trainer.py
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

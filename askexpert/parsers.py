"""Every jsonargparse parser askexpert builds reports a bad argument as one line (a `UserError`), not usage and a
traceback. `command_parser` makes the parser of each command that is not a Trainer method (`partition`,
`pipeline`, `evaluate`, ...): the same `--config FILE` handling, the DataModule's arguments under `data` and
one-line errors. (The LightningCLI subcommands' parser: askexpert/lightning_cli/.)
"""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser

from askexpert.errors import one_line_parse_error, undecodable_config


class CommandParser(ArgumentParser):
    """jsonargparse parser whose errors are one line (a UserError) instead of usage + traceback."""

    def error(self, message: str, ex: Exception | None = None):
        # a parser jsonargparse made for a class inside an option (no exit_on_error) does not know the command
        raise one_line_parse_error(message, self.prog, ex, nested=not self.exit_on_error) from None

    def parse_args(self, *args, **kwargs):
        try:
            return super().parse_args(*args, **kwargs)
        except UnicodeDecodeError as err:  # a config file that is not text: jsonargparse lets the error out
            raise undecodable_config(err) from None


def command_parser(name: str, description: str, with_data: bool = True, with_config: bool = True) -> CommandParser:
    parser = CommandParser(prog=f"python -m askexpert {name}", description=description, parser_mode="omegaconf")
    if with_config:
        parser.add_argument("--config", action=ActionConfigFile, help="YAML file(s) with any of the options below")
    if with_data:
        from datamodules.datamodule import ImageDataModule

        parser.add_class_arguments(ImageDataModule, "data")
    return parser

"""`python -m askexpert`: one entry point for every command.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands (built from the Trainer's methods; the
LightningCLI itself: askexpert/lightning_cli/). Every other command (`partition`, `experts`, `pipeline`, `evaluate`,
`ablate`, `route`, `profile`, `export`, `serve`, `edge`, `adapt`) registers in `EXTRA_COMMANDS` with its own
jsonargparse parser; this module's dispatcher hands each its arguments.
`main()` turns a `UserError` into one line on stderr and exit status 2 (3 for a diverged training run).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from askexpert.errors import UserError, one_line_for_user

# The Trainer subcommands and their help, without Lightning: `--help` and the dispatcher import nothing heavy;
# Lightning is imported when a Trainer command runs (`run_lightning_command`) or a command's module needs it.
from askexpert.lightning_cli.commands import LIGHTNING_COMMANDS


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
    "adapt": Command(
        "fine-tune the generalist on its experts' answers, round by round (adapt.csv)",
        _lazy("askexpert.commands.adapt"),
    ),
}


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
    from askexpert.lightning_cli.cli import run_lightning_command

    return run_lightning_command(argv, from_sys_argv=args is None)


def main() -> None:
    # Lightning's hint to prepend `srun` on any machine that has it: on a SLURM login node every local fit would
    # print it. askexpert submits its SLURM jobs itself (--launcher submitit), and a multi-task fit started
    # without srun is refused in one line (askexpert/lightning_cli/slurm.py), so the hint only adds noise.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    try:
        cli_main()
    except Exception as err:
        found = one_line_for_user(err)
        # Lightning's own exception type, looked up only if Lightning is loaded (an error before it never is one)
        lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
        misconfigured = getattr(lightning_errors, "MisconfigurationException", None)
        if found is None and misconfigured is not None and isinstance(err, misconfigured):
            found = (str(err).strip().splitlines()[0], 2)  # Lightning's word for a setting it refuses (`max_epochs -5`)
        if found is None:
            raise
        print(f"askexpert: error: {found[0]}", file=sys.stderr)
        sys.exit(found[1])

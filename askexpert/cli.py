"""`python -m askexpert`: one entry point for every command.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands (built from the Trainer's methods; the
LightningCLI itself: askexpert/lightning_cli/). Every other command (`partition`, `experts`, `pipeline`, `evaluate`,
`ablate`, `route`, `profile`, `export`, `serve`, `edge`, `adapt`) registers in `EXTRA_COMMANDS` with its own
jsonargparse parser; this module's dispatcher hands each its arguments.
`main()` turns a `UserError` into one line on stderr and exit status 2 (3 for a diverged training run), and
SIGTERM or SIGINT into one line saying how to resume and exit status 143 or 130 (askexpert/interrupts.py).
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from askexpert.errors import UserError, one_line_for_user
from askexpert.interrupts import Interrupted, exit_status, interruption, received_signal, stop_on_signals

# The Trainer subcommands and their help, without Lightning: `--help` and the dispatcher import nothing heavy;
# Lightning is imported when a Trainer command runs (`run_lightning_command`) or a command's module needs it.
from askexpert.lightning_cli.commands import LIGHTNING_COMMANDS

# What the line after SIGTERM or SIGINT tells the user to do (exit status 143 or 130).
RUN_AGAIN = "run the same command again"
RESUME_STAGES = "run the same command again: finished stages are skipped, the interrupted one resumes (last.ckpt)"


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], object]
    # after SIGTERM or SIGINT, how to resume; None: the command handles the signals itself (a server's drain)
    on_interrupt: str | None = RUN_AGAIN


def _lazy(module: str) -> Callable[[list[str]], object]:
    """Import a command's module only when it runs (keeps `--help` and the other commands fast)."""
    return lambda argv: importlib.import_module(module).run(argv)


# Commands that are not Trainer methods, each with its own parser in `askexpert.commands`.
EXTRA_COMMANDS: dict[str, Command] = {
    "partition": Command(
        "split the classes into expert subsets (JSON artefact)", _lazy("askexpert.commands.partition")
    ),
    "experts": Command(
        "train every expert of a partition (one fit each, one GPU each)",
        _lazy("askexpert.commands.experts"),
        "run it again for the unfinished experts (--experts) with `-- ... --ckpt_path last` to resume them",
    ),
    "pipeline": Command(
        "generalist -> base -> partition -> experts -> evaluation report, in one run folder",
        _lazy("askexpert.commands.pipeline"),
        RESUME_STAGES,
    ),
    "evaluate": Command(
        "re-evaluate a pipeline run (another gate, budget or device profile) from its cached logits",
        _lazy("askexpert.commands.evaluate"),
    ),
    "ablate": Command(
        "a grid of pipeline settings x seeds, sharing common stages, to results.csv/.md",
        _lazy("askexpert.commands.ablate"),
        RESUME_STAGES,
    ),
    "route": Command("classify a folder of images with a trained system, to CSV", _lazy("askexpert.commands.route")),
    "profile": Command(
        "time each model on this machine and write a device profile", _lazy("askexpert.commands.profile")
    ),
    "export": Command(
        "a finished run's generalist and experts as verified ONNX files + manifest", _lazy("askexpert.commands.export")
    ),
    # None: `serve` handles SIGTERM itself (a drain, then exit 0: README, "Deploy")
    "serve": Command("serve an export's experts over HTTP", _lazy("askexpert.commands.serve"), None),
    "edge": Command(
        "the edge side: generalist here, unsure images offloaded to a server, to CSV",
        _lazy("askexpert.commands.edge"),
        "run the same command again (its CSV is written at the end, atomically: nothing half-written is left)",
    ),
    "adapt": Command(
        "fine-tune the generalist on its experts' answers, round by round (adapt.csv)",
        _lazy("askexpert.commands.adapt"),
        "run the same command again: finished rounds are kept",
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


def on_interrupt(command: str) -> str | None:
    """What the line after SIGTERM or SIGINT says to do for `command`; None for a command that handles the
    signals itself (`serve`) or for no command at all (the overview)."""
    if command in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[command].on_interrupt
    if command == "fit":
        return "run the same command with --ckpt_path last to resume from its last.ckpt"
    return RUN_AGAIN if command in LIGHTNING_COMMANDS else None


def main() -> None:
    # Lightning's hint to prepend `srun` on any machine that has it: on a SLURM login node every local fit would
    # print it. askexpert submits its SLURM jobs itself (--launcher submitit), and a multi-task fit started
    # without srun is refused in one line (askexpert/lightning_cli/slurm.py), so the hint only adds noise.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    resume = on_interrupt(sys.argv[1] if len(sys.argv) > 1 else "")
    with stop_on_signals() if resume is not None else contextlib.nullcontext():
        try:
            cli_main()
            if resume is not None and received_signal() is not None:  # a signal some code caught: not finished
                raise Interrupted(received_signal())
        except BaseException as err:
            signum = interruption(err) if resume is not None else None
            if signum is not None:
                _exit_interrupted(signum, resume)
            found = _user_error_line(err) if isinstance(err, Exception) else None
            if found is None:
                raise  # a bug keeps its traceback (and SystemExit its status)
            print(f"askexpert: error: {found[0]}", file=sys.stderr)
            sys.exit(found[1])


def _exit_interrupted(signum: int, resume: str) -> None:
    print(f"askexpert: interrupted by {signal.Signals(signum).name}; {resume}", file=sys.stderr, flush=True)
    sys.exit(exit_status(signum))


def _user_error_line(err: Exception) -> tuple[str, int] | None:
    """(one line, exit status) of an error the user can fix; None for a bug."""
    found = one_line_for_user(err)
    # Lightning's own exception type, looked up only if Lightning is loaded (an error before it never is one)
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    misconfigured = getattr(lightning_errors, "MisconfigurationException", None)
    if found is None and misconfigured is not None and isinstance(err, misconfigured):
        found = (str(err).strip().splitlines()[0], 2)  # Lightning's word for a setting it refuses (`max_epochs -5`)
    return found

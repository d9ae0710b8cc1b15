"""`python -m askexpert evaluate --run DIR`: evaluate a pipeline run again from its artefacts.

    python -m askexpert evaluate --run runs/demo --routing.gate entropy --profile configs/profiles/pi4_lte_orin.yaml

Routing and profile default to the run's own settings (`DIR/pipeline.yaml`); anything given here replaces
them for this evaluation. Models run only where their logits are not cached yet, so another gate, budget or
profile costs seconds. The report files go to `--out` (default: the run folder, replacing its report.json,
report.md and pareto.png, each atomically); nothing else of the run changes (its logits cache may grow).
A run folder may be copied or moved: its paths are relative to it, and it keeps its own copy of the profile.
"""

from __future__ import annotations

import os

from askexpert.collab.system import RoutingConfig
from askexpert.errors import UserError
from askexpert.pipeline.finished_run import open_finished_run


def parser(defaults=None):
    from askexpert.parsers import command_parser

    p = command_parser("evaluate", "Evaluate a pipeline run from its cached logits.", with_data=False)
    p.add_argument("--run", type=str, required=True, help="pipeline run folder")
    p.add_argument("--out", type=str | None, default=None, help="folder for the report files (default: the run)")
    p.add_class_arguments(RoutingConfig, "routing", help="routing and operating point (default: the run's)")
    p.add_argument("--profile", type=str | None, default=None, help="device profile YAML (default: the run's)")
    p.add_argument("--wandb_project", type=str | None, default=None, help="also log the report to W&B")
    if defaults is not None:
        flat = {f"routing.{key}": value for key, value in defaults.routing.items()}
        p.set_defaults({**flat, "profile": defaults.profile, "wandb_project": defaults.wandb_project})
    return p


def run(argv: list[str]) -> dict:
    from askexpert.pipeline.report import evaluate_and_report
    from askexpert.pipeline.settings import find_config_file, recorded_profile, routing_config
    from askexpert.runs.lock import check_not_in_use

    # Two passes: the first finds the run (on the command line or in a --config file), the second parses
    # again with the run's own settings as defaults, so only what is given here replaces them.
    first = parser().parse_args(argv)
    finished = open_finished_run(first.run)
    saved = finished.settings
    # no lock (evaluate only adds a report and cached logits), but not while a pipeline or ablation still writes
    # the run: the report it is about to write would race this one
    check_not_in_use(first.run)
    args = parser(saved).parse_args(argv)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder for the report files")
    # a profile given here is found like any input file; the run's own is relative to the run (it may have moved)
    given = first.profile
    saved.profile = find_config_file(given, "device profile") if given else recorded_profile(first.run, saved.profile)
    saved.wandb_project = args.wandb_project
    return evaluate_and_report(saved, finished.layout, routing_config(args.routing), args.out)

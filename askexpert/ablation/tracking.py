"""An ablation's W&B options: `--wandb_project` and `--wandb_entity` set every cell's pipeline settings of the
same names, so each cell's stages and report are W&B runs of the group `<ablation>/<cell>/seed<k>`
(askexpert/pipeline/wandb_runs.py). Unset, they add nothing to a cell's command line: its settings, stages and
identity are what they were without them (a `fixed` wandb_project still applies)."""

from __future__ import annotations


def add_wandb_arguments(parser) -> None:
    parser.add_argument(
        "--wandb_project", type=str | None, default=None, help="log every cell's stages and report to this W&B project"
    )
    parser.add_argument("--wandb_entity", type=str | None, default=None, help="W&B entity (user or team) of those runs")


def wandb_arguments(args) -> list[str]:
    """The pipeline arguments a cell gets from the ablation's W&B options (after `fixed` and the cell's values)."""
    found = []
    for key in ("wandb_project", "wandb_entity"):
        value = args.get(key)
        if value:
            found += [f"--{key}", value]
    return found

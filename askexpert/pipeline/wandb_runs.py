"""How a pipeline run shows up in W&B: every stage's fit and the evaluation are runs of one group.

    group     the pipeline run: its --out folder's name; an ablation cell's `<ablation>/<cell>/seed<k>`
    job_type  the stage's kind (generalist, base, experts), `evaluation` for the report
    name      the stage and seed, e.g. `experts/progressive/0 seed0`
    tags      seed<k>, specialization:<strategy>, partition:<method>

A stage's identity is the hash of its resolved fit config (askexpert/pipeline/stages.py), so none of this goes
into its fit arguments: a stage's fit gets them as W&B's own environment variables (`wandb.init`, and Lightning's
`WandbLogger` through it, read WANDB_RUN_GROUP, WANDB_JOB_TYPE, WANDB_NAME, WANDB_TAGS and WANDB_ENTITY when
not given as arguments), whether it runs in this process (`run_fit`), as a child process (the launcher) or as a
submitit job (askexpert/cluster/stage_job.py). Nothing is set when the pipeline has no `wandb_project`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

# The variables `wandb_stage_env` may set (and `stage_environment` restores).
WANDB_ENV = ("WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_NAME", "WANDB_TAGS", "WANDB_ENTITY")
EVALUATION = "evaluation"
# An ablation's cell runs in `<ablation>/cells/<cell>/seed<k>` (askexpert/commands/ablate.py)
CELLS_DIR = "cells"


def run_group(root: str) -> str:
    """The W&B group of a pipeline run: its folder's name, or `<ablation>/<cell>/seed<k>` for an ablation's cell."""
    path = os.path.abspath(root)
    seed_dir, cell_dir = os.path.split(path)[1], os.path.dirname(path)
    cells = os.path.dirname(cell_dir)
    if re.fullmatch(r"seed-?\d+", seed_dir) and os.path.basename(cells) == CELLS_DIR:
        ablation = os.path.basename(os.path.dirname(cells))
        return f"{ablation}/{os.path.basename(cell_dir)}/{seed_dir}"
    return os.path.basename(path)


def run_tags(settings) -> list[str]:
    """The tags of every W&B run of a pipeline run: its seed, strategy and partition method (no commas:
    WANDB_TAGS is a comma-separated list)."""
    tags = [f"seed{settings.seed}", f"specialization:{settings.specialization}"]
    tags.append(f"partition:{settings.partition.method}")
    return [tag.replace(",", ";")[:64] for tag in tags]


def wandb_stage_env(stage, settings, layout) -> dict[str, str]:
    """W&B's environment variables for one stage's fit (see the module docstring); empty when the pipeline does
    not log to W&B or the stage is no fit (the partition)."""
    if not settings.get("wandb_project") or not stage.trains:
        return {}
    env = {
        "WANDB_RUN_GROUP": run_group(layout.root),
        "WANDB_JOB_TYPE": stage.kind.value,
        "WANDB_NAME": f"{stage.name} seed{settings.seed}",
        "WANDB_TAGS": ",".join(run_tags(settings)),
    }
    if settings.get("wandb_entity"):
        env["WANDB_ENTITY"] = settings.wandb_entity
    return env


@contextlib.contextmanager
def stage_environment(env: dict[str, str]):
    """`env` in os.environ while the block runs (an in-process fit, a submitit job), then the environment as it
    was; the W&B run the block left open (Lightning's WandbLogger does not finish its run) is finished, so the
    next stage's fit starts a run of its own."""
    if not env:
        yield
        return
    before = {name: os.environ.get(name) for name in env}
    open_before = getattr(sys.modules.get("wandb"), "run", None)
    os.environ.update(env)
    _reread_environment()
    try:
        yield
    finally:
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None)
        if run is not None and run is not open_before:
            wandb.finish()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reread_environment()


def _reread_environment() -> None:
    """W&B reads its environment variables once per process, into its settings singleton (`wandb.setup`): with
    no run open, drop that singleton so the next `wandb.init` reads them again (a stage's names, or none)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is None:
        wandb.teardown()


def report_run(settings, layout, folder: str) -> dict:
    """`log_to_wandb`'s W&B run arguments for a run's evaluation written to `folder`: the run's group, job type
    `evaluation`, its tags and entity; named `evaluation seed<k>`, or after `folder` when the report goes
    elsewhere than the run (`evaluate --out`)."""
    own = os.path.abspath(folder) == os.path.abspath(layout.root)
    name = f"{EVALUATION} seed{settings.seed}" if own else f"{EVALUATION} {os.path.basename(os.path.abspath(folder))}"
    return {
        "name": name,
        "group": run_group(layout.root),
        "job_type": EVALUATION,
        "tags": run_tags(settings),
        "entity": settings.get("wandb_entity") or None,
    }


def log_report(report: dict, paths: dict[str, str], folder: str, settings, layout) -> None:
    """The report's tables and plot as a W&B run of the pipeline run's group (when it logs to W&B)."""
    if not settings.get("wandb_project"):
        return
    from askexpert.collab.report import log_to_wandb

    log_to_wandb(report, paths, folder, settings.wandb_project, **report_run(settings, layout, folder))

"""A pipeline run made ready without writing anything: its settings normalised, everything checked that can be
checked without training, every stage planned (resolved), and the pipeline.yaml and profile copy it will write.

`pipeline` prepares one run; `ablate` prepares every cell of its grid before the first one trains, so a bad key
in the last cell fails at once.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from askexpert.collab.costs import load_profile
from askexpert.collab.system import RoutingConfig
from askexpert.errors import UserError
from askexpert.pipeline.checks import (
    check_budget_is_reachable,
    check_out_folder,
    check_out_is_a_folder,
    check_partition_settings,
    check_routing,
    check_settings_shape,
    check_strategies,
)
from askexpert.pipeline.record import load_record
from askexpert.pipeline.settings import PROFILE_DIR, normalise_settings, parser, routing_config
from askexpert.pipeline.stages import Stage, plan_stages
from askexpert.runs.layout import RunLayout
from datamodules.datamodule import ImageDataModule
from datamodules.sources import planning_without_data


@dataclass
class PreparedRun:
    """A pipeline run checked and planned, with nothing written yet."""

    settings: Any
    layout: RunLayout
    routing: RoutingConfig
    stages: list[Stage]
    record: dict
    stale: list[str]
    settings_yaml: str
    profile_copy: tuple[str, bytes] | None = None  # (path in the run, content) of the run's own device profile


def prepare(
    settings,
    overwrite: bool,
    cache: dict | None = None,
    explicit_data: set[str] = frozenset(),
    dry_run: bool = False,
    own_files: tuple[str, ...] = (),
) -> PreparedRun:
    """Normalise the settings, check everything that can be checked without training and plan the stages; writes
    nothing. `explicit_data`: the data keys the pipeline config or command line set (`explicit_data_keys`);
    `dry_run`: build no GPU trainer and accept a changed config (the plan says what would retrain); `own_files`:
    files of the caller that may sit in the run folder (an ablation's cell record)."""
    # a dry run plans a CIFAR-100 config without the files (their classes are known); a real run needs them
    with planning_without_data() if dry_run else contextlib.nullcontext():
        return _prepare(settings, overwrite, cache, explicit_data, dry_run, own_files)


def _prepare(settings, overwrite, cache, explicit_data, dry_run, own_files) -> PreparedRun:
    # the cheap checks first (what normalising reads, the run folder), then every stage's arguments
    check_settings_shape(settings)
    layout = RunLayout(settings.out)
    check_out_is_a_folder(layout)
    record = load_record(layout, overwrite=overwrite)
    normalise_settings(settings, layout.root)
    profile = load_profile(settings.profile)
    routing = routing_config(settings.routing)
    datamodule = ImageDataModule(**settings.data.as_dict())
    check_routing(routing, datamodule)
    check_partition_settings(settings.partition, datamodule)
    check_strategies(settings)
    stages = plan_stages(settings, layout, cache, set(explicit_data), cpu_trainer=dry_run)
    check_budget_is_reachable(routing, profile, stages[0].config, datamodule)
    stale = check_out_folder(layout, stages, record, overwrite or dry_run, own_files)
    settings_yaml, profile_copy = _run_files(settings)
    return PreparedRun(settings, layout, routing, stages, record, stale, settings_yaml, profile_copy)


def _run_files(settings) -> tuple[str, tuple[str, bytes]]:
    """(pipeline.yaml's text, (path in the run, content) of the profile copy). pipeline.yaml names the run's own
    copy of the profile, relative to the run: the run can move."""
    copy = os.path.join(PROFILE_DIR, os.path.basename(settings.profile))
    try:
        with open(settings.profile, "rb") as handle:
            content = handle.read()
    except OSError as err:
        raise UserError(f"cannot read device profile {settings.profile}: {err.strerror}") from None
    saved = settings.clone()
    saved.profile = copy
    del saved["launcher"]  # where the stages ran is not part of the run (a run is the same on either launcher)
    return parser().dump(saved, skip_none=False, skip_validation=True), (copy, content)

"""What is checked about a pipeline run before anything trains, besides each stage's own arguments (those are
checked by resolving them, askexpert/pipeline/resolve.py): the settings' shape, the run folder, routing, the
partition, the strategies and the budget.

Each check raises a UserError naming the problem and changes nothing: what the settings mean is settled before
the checks run (askexpert/pipeline/settings.py's `normalise_settings`).
"""

from __future__ import annotations

import os

import strategies
from askexpert.collab.system import NO_CALIBRATION_SPLIT, RoutingConfig
from askexpert.errors import UserError
from askexpert.pipeline.partitioning import check_overlap_setting
from askexpert.pipeline.record import stages_file
from askexpert.pipeline.settings import section_of
from askexpert.pipeline.stages import Stage
from askexpert.runs.layout import RunLayout, expert_families
from askexpert.runs.lock import LEASE_FILE, LOCK_FILE
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import METHODS


def check_settings_shape(settings) -> None:
    """The sections are mappings (a config file may have set one to a plain value), and the numbers that
    everything else reads are in range."""
    for section in ("data", "generalist", "base", "partition", "experts"):
        section_of(settings, section)
    if settings.get("parallel_experts", 1) < 1:
        raise UserError(f"--parallel_experts must be at least 1, got {settings.parallel_experts}")


def check_out_is_a_folder(layout: RunLayout) -> None:
    if os.path.exists(layout.root) and not os.path.isdir(layout.root):
        raise UserError(f"--out {layout.root} is a file, not a folder")


def check_routing(routing: RoutingConfig, datamodule: ImageDataModule) -> None:
    routing.check(datamodule.num_classes)
    calibrated = datamodule.hparams.val_fraction > 0 or datamodule.hparams.calib_fraction > 0
    if routing.needs_calibration() and not calibrated:
        raise UserError(NO_CALIBRATION_SPLIT)


def check_partition_settings(part, datamodule: ImageDataModule) -> None:
    """The partition (`part`: the settings' partition section) is built after the generalist trains (confusion,
    overlap); its settings are checked now, by building it from the class names wherever no trained model is
    needed."""
    if part.method not in METHODS:
        raise UserError(f"unknown partition method {part.method!r}; methods: {', '.join(METHODS)}")
    if part.num_experts < 1:
        raise UserError(f"--partition.num_experts must be at least 1, got {part.num_experts}")
    if part.method == "explicit" and not part.experts:
        raise UserError("--partition.method explicit needs the class lists: --partition.experts [[...], [...]]")
    if (part.method == "confusion" or part.overlap) and datamodule.hparams.val_fraction == 0:
        raise UserError("confusion partitions and overlap read validation data: set --data.val_fraction above 0")
    if part.method == "confusion":
        if part.num_experts > datamodule.num_classes:
            raise UserError(
                f"--partition.num_experts {part.num_experts} is more than the {datamodule.num_classes} classes"
            )
    # builds a partition of any other method without the overlap (which needs the trained generalist)
    check_overlap_setting(part, datamodule, "--partition.overlap")


def check_strategies(settings) -> None:
    for family in expert_families(settings.specialization, settings.static_baseline):
        strategies.class_path(family)  # unknown names fail here, listing the known ones


def check_budget_is_reachable(routing: RoutingConfig, profile, generalist_config: dict, datamodule) -> None:
    """The cheapest operating point answers everything on the edge: a budget below it can never be met."""
    from askexpert.collab.costs import CostModel, model_cost

    limits = {"budget": routing.budget_dict(), "constrained": routing.constrained_dict()}
    if not any({"latency_ms", "energy_mj"} & set(budget) for budget in limits.values()):
        return
    model_name = generalist_config["model"]["init_args"]["model_name"]
    size = datamodule.hparams.image_size
    edge = CostModel(profile, (3, size, size)).on_edge(model_cost(profile, model_name, datamodule.num_classes, size))
    for name, budget in limits.items():
        for key, cheapest in (("latency_ms", edge.latency_ms), ("energy_mj", edge.edge_energy_mj)):
            if key in budget and budget[key] < cheapest:
                raise UserError(
                    f"--routing.{name}.{key} {budget[key]} cannot be met: answering on the edge alone already costs "
                    f"{cheapest:.3g} with this profile"
                )


def check_out_folder(
    layout: RunLayout, stages: list[Stage], record: dict, overwrite: bool, own_files: tuple[str, ...] = ()
) -> list[str]:
    """Names of stages whose recorded config differs; refuses them (and foreign folders: files other than
    `own_files`, the caller's records) unless overwrite. A stage that diverged is not done: a new config for it
    is what the user is expected to try. (`prepare` has checked that --out is a folder, if it exists.)"""
    is_a_run = os.path.isfile(stages_file(layout))  # a damaged stages.json, read as no record by --overwrite, too
    foreign = os.path.isdir(layout.root) and set(os.listdir(layout.root)) - {*own_files, LOCK_FILE, LEASE_FILE}
    if not is_a_run and foreign:
        # even with --overwrite: only a pipeline's own stages are ever deleted
        raise UserError(f"--out {layout.root} already holds files that are not a pipeline run; choose another folder")
    planned = {s.name: s for s in stages}
    changed = [
        name
        for name, entry in record.items()
        if name in planned and entry.get("identity") != planned[name].identity and not entry.get("diverged")
    ]
    gone = [name for name in record if name not in planned]
    if (changed or gone) and not overwrite:
        names = ", ".join((changed + gone)[:6]) + (
            f" and {len(changed + gone) - 6} more" if len(changed + gone) > 6 else ""
        )
        raise UserError(
            f"--out {layout.root} holds a run with a different config (stages: {names}); "
            "use another --out, or --overwrite to retrain what changed"
        )
    return changed + gone

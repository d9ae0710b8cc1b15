"""Reading a pipeline run back: the one way the commands that read a run (`evaluate`, `route`, `export`,
`profile`) open it.

A run is its folder (`RunLayout`: where each artefact lies) and the settings it was made with (`pipeline.yaml`),
checked when read (`read_settings`): a key filled in with its default would evaluate another test set, partition
or profile than the run was trained on, so a missing key or one at odds with stages.json is refused. The
commands that turn a run's models into a result refuse a run whose stages did not all finish
(`open_finished_run`): a diverged or interrupted stage would give a report, a routing or an export that looks
like a result. `profile` only times the models that exist, so it opens any run (`open_run`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from askexpert.collab.report_file import read_report
from askexpert.errors import UserError
from askexpert.files.reading import DamagedFile, read_yaml_file
from askexpert.pipeline.record import check_finished, load_record, stages_file
from askexpert.pipeline.settings import DATASET_KEYS, LATER_DATA_DEFAULTS, expert_count
from askexpert.pipeline.settings import parser as pipeline_parser
from askexpert.pipeline.stage_arguments import same_value
from askexpert.runs.layout import RunLayout, expert_families
from datamodules.partitions import Partition

# What every pipeline.yaml has held since runs kept one (`pipeline` writes every option): without one of them the
# parser would fill in a default, and a run would be evaluated on another test set, partition or profile.
REQUIRED_SETTINGS = {
    "": (
        *("out", "seed", "data", "generalist", "base", "partition", "experts"),
        *("specialization", "static_baseline", "routing", "profile"),
    ),
    "partition": ("method", "num_experts", "overlap", "seed", "experts", "allow_uncovered"),
    "routing": ("gate", "threshold", "top_k", "temperature", "fusion", "seed"),
    "data": tuple(key for key in DATASET_KEYS if key not in LATER_DATA_DEFAULTS),
}
# Dataset keys that say where this machine keeps the data and how it loads it, not which data: a run copied to
# another machine has them edited (docs/architecture.md, "Relocatable"), and evaluates and routes the same.
MACHINE_LOCAL_DATA_KEYS = ("root", "download", "verify_checksums", "max_memory_gb")


def read_settings(run_dir: str):
    """The pipeline settings a run was made with (its `pipeline.yaml`), checked when read: a file askexpert wrote
    (YAML, a mapping, every key a run has always had) that agrees with the run's stages.json (the dataset, the
    partition, the seed and the experts its stages were trained with). Anything else is one line naming the file
    and the key; nothing is filled in with a default."""
    layout = RunLayout(run_dir)
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder not found: {run_dir}")
    if not os.path.isfile(layout.settings):
        raise UserError(f"{run_dir} is not a pipeline run (no pipeline.yaml); run `python -m askexpert pipeline` first")
    raw = _raw_settings(layout.settings)
    try:
        settings = pipeline_parser().parse_path(layout.settings)
    except UserError as err:  # the parser's reason ("arguments are required: out") names no file: say which
        raise _damaged(layout.settings, str(err).split(" (see `")[0]) from None
    _check_against_record(settings, raw, layout)
    return settings


def _damaged(path: str, reason: str) -> UserError:
    return UserError(
        f"{path} is damaged ({reason}); restore it, or run the pipeline again with the run's config and --out "
        "(finished stages are skipped) to rewrite it"
    )


def _raw_settings(path: str) -> dict:
    """pipeline.yaml as plain YAML, with every key of `REQUIRED_SETTINGS` (a truncated file lacks some)."""
    try:
        raw = read_yaml_file(path)
    except DamagedFile as err:
        raise _damaged(path, err.reason) from None
    if not isinstance(raw, dict):
        raise _damaged(path, "empty, or not a mapping of settings")
    for section, keys in REQUIRED_SETTINGS.items():
        found = raw.get(section) if section else raw
        if not isinstance(found, dict):
            raise _damaged(path, f"{section} is not a mapping of settings")
        missing = [key for key in keys if key not in found]
        if missing:
            where = f"{section}." if section else ""
            raise _damaged(path, f"{where}{missing[0]} is missing: the file may be truncated")
    return raw


def _check_against_record(settings, raw: dict, layout: RunLayout) -> None:
    """pipeline.yaml against what stages.json recorded of the run's training: the keys that define the dataset
    (where it lies on this machine may differ) and the partition (the partition stage's config, else a training
    stage's data), the seed (the generalist's), and the stages (each recorded one must be one of the settings'
    stages)."""
    record = load_record(layout)

    def refuse(difference: str) -> UserError:
        return UserError(
            f"{layout.settings} does not match {stages_file(layout)}: {difference}; restore pipeline.yaml, or run "
            "the pipeline again with the run's config and --out (finished stages are skipped) to rewrite it"
        )

    data = settings.data.as_dict()
    for key, recorded in _recorded_dataset(record).items():
        if key in data and not same_value(recorded, data[key]):
            there = f"{data[key]!r} there" if key in raw["data"] else "missing there"
            raise refuse(f"data.{key} is {there} but the run was trained with {recorded!r}")
    recorded_partition = _recorded_config(record, "partition").get("partition", {})
    partition = settings.partition.as_dict()
    for key, recorded in recorded_partition.items():
        if key in partition and partition[key] != recorded:
            raise refuse(f"partition.{key} is {partition[key]!r} there but the run was trained with {recorded!r}")
    recorded_seed = _recorded_config(record, "generalist").get("seed_everything")
    if recorded_seed is not None and recorded_seed != settings.seed:
        raise refuse(f"seed is {settings.seed!r} there but the run was trained with {recorded_seed!r}")
    planned = set(stage_names(settings))
    for name in record:
        if name not in planned:
            raise refuse(
                f"its stage {name} is not one of those specialization {settings.specialization!r}, static_baseline "
                f"{settings.static_baseline} and {expert_count(settings.partition)} experts make"
            )


def _recorded_config(record: dict, name: str) -> dict:
    config = record.get(name, {}).get("config")
    return config if isinstance(config, dict) else {}


def _recorded_dataset(record: dict) -> dict:
    """The dataset keys that define the data the run's stages were trained with (not `MACHINE_LOCAL_DATA_KEYS`):
    the partition stage's, else the generalist's or the base model's `data` (an interrupted run may have no
    partition yet)."""
    defining = set(DATASET_KEYS) - set(MACHINE_LOCAL_DATA_KEYS)
    for name in ("partition", "generalist", "base"):
        data = _recorded_config(record, name).get("data")
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key in defining}
    return {}


def stage_names(settings) -> list[str]:
    """The stages a run's settings make, by name (as stages.json and the run's folders name them)."""
    names = ["generalist", "base", "partition"]
    for family in expert_families(settings.specialization, settings.static_baseline):
        names += [f"experts/{family}/{i}" for i in range(expert_count(settings.partition))]
    return names


@dataclass(frozen=True)
class PipelineRun:
    """A run folder read back: where its artefacts are and the settings that made them."""

    layout: RunLayout
    settings: Any  # its pipeline.yaml, parsed by the pipeline's parser

    def operating_point(self, second_expert: bool = False) -> tuple[dict, float]:
        """The routing settings (temperature value, gate, top-k, fusion) and threshold the run's report selected.

        With `second_expert`, the routing also says whether a second expert is asked: `second_expert` is
        {"margin", "fusion"} of the report's two-expert point, whose own threshold (chosen with its margin) is
        then the one returned, or None when the report has no such point (evaluated without
        `--routing.second_expert.enabled true`): the one-expert point, as without `second_expert`."""
        report = read_report(self.layout.root)  # checked by type and range there
        routing, threshold = report["routing"], float(report["selected"]["threshold"])
        point = {key: routing[key] for key in ("temperature_value", "gate", "top_k", "fusion")}
        if not second_expert:
            return point, threshold
        pair = report.get("second_expert")
        point["second_expert"] = None
        if pair is not None:
            point["second_expert"] = {"margin": float(pair["margin"]), "fusion": str(pair["fusion"])}
            threshold = float(pair["threshold"])
        return point, threshold

    def partition(self) -> Partition:
        return Partition.load(self.layout.partition)

    def model_checkpoints(self) -> list[str]:
        """The best checkpoint of each of the run's models that exists so far (generalist, base, every expert of
        every family), in path order."""
        layout = self.layout
        folders = [layout.stage_dir("generalist"), layout.stage_dir("base")]
        for family in expert_families(self.settings.specialization, self.settings.static_baseline):
            folders += [layout.expert_dir(family, i) for i in range(expert_count(self.settings.partition))]
        return sorted(path for path in map(layout.best, folders) if os.path.isfile(path))


def open_run(run_dir: str) -> PipelineRun:
    """The pipeline run in `run_dir`, finished or not."""
    return PipelineRun(RunLayout(run_dir), read_settings(run_dir))


def open_finished_run(run_dir: str) -> PipelineRun:
    """The pipeline run in `run_dir`, refused unless every stage it recorded finished."""
    run = open_run(run_dir)
    check_finished(run.layout)
    return run

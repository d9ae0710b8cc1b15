"""Reading a pipeline run back: the one way the commands that read a run (`evaluate`, `route`, `export`,
`profile`) open it.

A run is its folder (`RunLayout`: where each artefact lies) and the settings it was made with (`pipeline.yaml`).
The commands that turn a run's models into a result refuse a run whose stages did not all finish
(`open_finished_run`): a diverged or interrupted stage would give a report, a routing or an export that looks
like a result. `profile` only times the models that exist, so it opens any run (`open_run`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from askexpert.errors import UserError
from askexpert.pipeline.record import check_finished
from askexpert.pipeline.settings import expert_count
from askexpert.pipeline.settings import parser as pipeline_parser
from askexpert.runs.layout import RunLayout, expert_families
from datamodules.partitions import Partition


def read_settings(run_dir: str):
    """The pipeline settings a run was made with (its `pipeline.yaml`)."""
    layout = RunLayout(run_dir)
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder not found: {run_dir}")
    if not os.path.isfile(layout.settings):
        raise UserError(f"{run_dir} is not a pipeline run (no pipeline.yaml); run `python -m askexpert pipeline` first")
    try:
        return pipeline_parser().parse_path(layout.settings)
    except UserError as err:  # the parser's reason ("arguments are required: out") names no file: say which
        reason = str(err).split(" (see `")[0]
        raise UserError(
            f"{layout.settings} is damaged ({reason}); restore it, or run the pipeline again with the run's config "
            "and --out (finished stages are skipped) to rewrite it"
        ) from None


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
        run_dir = self.layout.root
        report_path = os.path.join(run_dir, "report.json")
        if not os.path.isfile(report_path):
            raise UserError(f"{run_dir} has no report.json yet: finish it with `python -m askexpert pipeline` first")
        try:
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f)
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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise UserError(
                f"{report_path} is damaged; write it again with `python -m askexpert evaluate --run {run_dir}`"
            ) from None

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

"""`python -m askexpert ablate`: a grid of pipeline runs x seeds, sharing the stages they have in common.

    python -m askexpert ablate --config configs/ablations/strategies.yaml --out runs/ablations/strategies

An ablation config names a pipeline config (`pipeline`), the keys to vary (`grid`, see
`askexpert.ablation.grid`), settings for every cell (`fixed`) and `seeds`. Each (cell, seed) is a pipeline
run in `DIR/cells/<cell>/seed<k>/`; its stages live in a store (`--store`, default `DIR/store`) under
their identity, so a generalist is trained once per seed and data setting, not once per cell, and cells
that differ only in routing (`routing.*`) train nothing at all. Before anything trains, every cell is
planned and checked (a bad key or value fails at once). A finished cell is skipped; an interrupted one
resumes. A cell whose training diverges (askexpert/callbacks/guard.py) is recorded as diverged, with the stage and step,
and the ablation goes on; cells that share the diverged stage are recorded without training it again (in this
process: a rerun tries diverged cells again). Results go to `DIR/results.csv`, `results.md` (which lists
diverged cells) and `results.png`, rewritten after every cell.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from typing import Any

from askexpert.ablation import cells as cell_files
from askexpert.ablation import grid as grids
from askexpert.ablation import results
from askexpert.ablation.store import StageStore
from askexpert.ablation.tracking import add_wandb_arguments, wandb_arguments
from askexpert.cluster.launch import (
    check_can_submit,
    check_jobs,
    describe_jobs,
    record_outcome,
    stage_keys,
    train_on_cluster,
)
from askexpert.errors import DivergenceError, RunsDivergedError, UserError, find_user_error
from askexpert.files.atomic import write_json
from askexpert.pipeline.launcher_settings import add_launcher_arguments, launcher_settings, launcher_shorthand
from askexpert.pipeline.prepare import prepare
from askexpert.pipeline.runner import execute
from askexpert.pipeline.settings import expert_count, find_config_file, parse_settings
from askexpert.pipeline.wandb_runs import log_report
from askexpert.runs.lock import LEASE_FILE, LOCK_FILE, locked

SPEC_FILE = "ablation.json"


def parser():
    from askexpert.parsers import command_parser

    p = command_parser("ablate", "Run a grid of pipeline settings x seeds and tabulate the results.", with_data=False)
    p.add_argument("--pipeline", type=str, required=True, help="pipeline config every cell starts from")
    p.add_argument("--grid", type=dict[str, list[Any]], required=True, help="{pipeline key: [values]}")
    p.add_argument("--fixed", type=dict[str, Any], default={}, help="{pipeline key: value} for every cell")
    p.add_argument("--seeds", type=list[int], default=[0], help="every cell runs once per seed")
    p.add_argument("--out", type=str, required=True, help="ablation folder (cells, results)")
    p.add_argument("--store", type=str | None, default=None, help="shared stages (default: OUT/store)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace results of a different grid or config")
    p.add_argument("--dry_run", type=bool, default=False, help="print the plan (cells, stages to train) and stop")
    add_wandb_arguments(p)
    add_launcher_arguments(p)
    return p


@dataclasses.dataclass
class PlannedRun:
    """One (cell, seed): its prepared pipeline run and the identity its finished result must carry."""

    cell: grids.Cell
    seed: int
    prepared: Any
    identity: str

    @property
    def folder(self) -> str:
        return self.prepared.layout.root


def _spec(args, pipeline_path: str) -> dict:
    return {"pipeline": pipeline_path, "grid": args.grid, "fixed": args.fixed, "seeds": args.seeds}


def _settings(args, pipeline_path: str, cell: grids.Cell, seed: int, folder: str):
    """The pipeline settings of one (cell, seed): the pipeline config, then `fixed`, then the cell's values."""
    fixed_args, fixed_overrides = grids.cell_arguments(args.fixed)
    cell_args, cell_overrides = grids.cell_arguments(dict(cell.values))
    argv = ["--config", pipeline_path, *fixed_args, *cell_args, *wandb_arguments(args), "--out", folder]
    argv += ["--seed", str(seed)]
    settings, explicit = parse_settings(argv)
    # a stage's overrides are a mapping: given on the command line, one would replace the config's, not add to it
    for overrides in (fixed_overrides, cell_overrides):
        for stage, values in overrides.items():
            section = settings.get(stage)
            section.overrides = {**(section.overrides or {}), **values}
    return settings, explicit


def _routing_identity(routing: dict) -> dict:
    """The routing settings as a cell's identity sees them: an unset `constrained` point and a disabled second
    expert (both added later) are left out, so cells finished before they existed stay done."""
    constrained = routing.get("constrained") or {}
    if not any(value is not None for value in constrained.values()):
        routing = {key: value for key, value in routing.items() if key != "constrained"}
    if not (routing.get("second_expert") or {}).get("enabled"):
        routing = {key: value for key, value in routing.items() if key != "second_expert"}
    return routing


def _cell_identity(prepared) -> str:
    """What a cell's result depends on: its stages and its evaluation settings (routing, profile file)."""
    settings = prepared.settings
    with open(settings.profile, "rb") as handle:
        profile = hashlib.sha256(handle.read()).hexdigest()
    text = json.dumps(
        {
            "stages": [(s.name, s.identity) for s in prepared.stages],
            "routing": _routing_identity(settings.routing.as_dict()),
            "profile": profile,
            "specialization": settings.specialization,
            "static_baseline": settings.static_baseline,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_out_folder(out: str, spec: dict, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    saved_path = os.path.join(out, SPEC_FILE)
    saved = cell_files.load_json(saved_path)
    if saved is None:
        if os.path.isdir(out) and set(os.listdir(out)) - {LOCK_FILE, LEASE_FILE}:
            raise UserError(f"--out {out} already holds files that are not an ablation; choose another folder")
        return
    same_order = list(saved.get("grid") or {}) == list(spec["grid"])  # the order names the cells and columns
    if (saved != json.loads(json.dumps(spec)) or not same_order) and not overwrite:
        changed = [key for key in spec if saved.get(key) != json.loads(json.dumps(spec[key]))] or ["grid order"]
        raise UserError(
            f"--out {out} holds the results of a different ablation ({', '.join(changed)} differ); use another "
            "--out, or --overwrite to replace them (stages already trained are reused)"
        )


def plan(args) -> tuple[dict, list[PlannedRun], StageStore]:
    """Every (cell, seed) checked and planned, nothing written."""
    grids.check_seeds(args.seeds)
    if not isinstance(args.fixed, dict):
        raise UserError(f"--fixed must map pipeline keys to values, got {args.fixed!r}")
    grids.check_keys(list(args.fixed), "fixed")
    both = set(args.fixed) & set(args.grid)
    if both:
        raise UserError(f"keys both fixed and in the grid: {', '.join(sorted(both))}")
    cells = grids.expand(args.grid)
    pipeline_path = find_config_file(args.pipeline, "pipeline config")
    out = os.path.abspath(args.out)
    spec = _spec(args, pipeline_path)
    check_out_folder(out, spec, args.overwrite)
    store = StageStore(args.store or os.path.join(out, "store"))
    if os.path.exists(store.root) and not os.path.isdir(store.root):
        raise UserError(f"--store {args.store} is a file, not a folder")
    cache: dict = {}
    runs = []
    for seed in args.seeds:
        for cell in cells:
            folder = os.path.join(out, "cells", cell.name, f"seed{seed}")
            try:
                settings, explicit = _settings(args, pipeline_path, cell, seed, folder)
                own = (cell_files.CELL_FILE,)
                prepared = prepare(settings, args.overwrite, cache, explicit, args.dry_run, own_files=own)
            except Exception as err:
                found = find_user_error(err)
                if found is None:
                    raise
                values = ", ".join(f"{k}={v}" for k, v in cell.columns().items())
                raise UserError(f"cell {values or 'default'} (seed {seed}): {found}") from None
            identity = _cell_identity(prepared)
            saved = cell_files.load_json(os.path.join(folder, cell_files.CELL_FILE))
            if saved and saved.get("identity") != identity and not args.overwrite:
                raise UserError(
                    f"{folder} holds a result made with another config; use another --out, or --overwrite to redo it"
                )
            runs.append(PlannedRun(cell, seed, prepared, identity))
    return spec, runs, store


def describe_plan(runs: list[PlannedRun], store: StageStore) -> str:
    unique = {stage.identity: stage for planned in runs for stage in planned.prepared.stages}
    kinds: dict[str, int] = {}
    for stage in unique.values():
        kinds[stage.kind.value] = kinds.get(stage.kind.value, 0) + 1
    todo = sum(not store.is_done(stage) for stage in unique.values())
    stage_counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    cells = len({p.cell.name for p in runs})
    seeds = len({p.seed for p in runs})
    return (
        f"{cells} cells x {seeds} seeds = {len(runs)} runs, sharing {len(unique)} distinct stages ({stage_counts}); "
        f"{todo} still to train"
    )


def _remove_stale(out: str, runs: list[PlannedRun]) -> None:
    """--overwrite: drop cell folders that are not part of this grid, and the old result files."""
    keep = {os.path.abspath(p.folder) for p in runs}
    cells_dir = os.path.join(out, "cells")
    for cell_name in os.listdir(cells_dir) if os.path.isdir(cells_dir) else []:
        cell_dir = os.path.join(cells_dir, cell_name)
        if not os.path.isdir(cell_dir) or os.path.islink(cell_dir):
            continue
        for seed_dir in os.listdir(cell_dir):  # only the ablation's own seed<k> run folders are removed
            path = os.path.abspath(os.path.join(cell_dir, seed_dir))
            if re.fullmatch(r"seed-?\d+", seed_dir) and os.path.isdir(path) and path not in keep:
                shutil.rmtree(path)
        if not os.listdir(cell_dir):
            os.rmdir(cell_dir)
    for name in ("results.csv", "results.md", "results.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def run_cell(planned: PlannedRun, store: StageStore) -> dict:
    from askexpert.collab.evaluation import evaluate_run
    from askexpert.collab.report import write_report

    prepared = planned.prepared
    settings = prepared.settings
    execute(prepared, store)
    started = time.time()
    report = evaluate_run(
        dataclasses.replace(prepared.layout, shared_logits=True),
        settings.data.as_dict(),
        settings.specialization,
        settings.static_baseline,
        copy.deepcopy(prepared.routing),
        settings.profile,
        settings.seed,
        num_experts=expert_count(settings.partition),
    )
    paths = write_report(report, planned.folder)
    log_report(report, paths, planned.folder, settings, prepared.layout)  # when the cell logs to W&B
    rows = results.report_rows(report, planned.cell.columns(), planned.seed)
    record = {
        "cell": planned.cell.columns(),
        "seed": planned.seed,
        "identity": planned.identity,
        "rows": rows,
        "stand_in": report["data"]["stand_in"],
        "provenance": report["provenance"],
        "settings": prepared.settings_yaml,
        "stages": {s.name: {"identity": s.identity, "config": s.config} for s in prepared.stages},
        **results.cell_minutes(prepared.record, time.time() - started),
    }
    write_json(os.path.join(planned.folder, cell_files.CELL_FILE), record, indent=1, default=str)
    return record


def run(argv: list[str]) -> list[dict]:
    args = parser().parse_args(launcher_shorthand(argv))
    launcher = launcher_settings(args.launcher)
    if launcher.name == "submitit" and not args.dry_run:
        check_can_submit(launcher)
    spec, runs, store = plan(args)
    if launcher.name == "submitit":
        check_jobs([p.prepared for p in runs if not cell_files.finished(p)], store, launcher)
    out = os.path.abspath(args.out)
    print(f"ablation: {describe_plan(runs, store)}", flush=True)
    if args.dry_run:
        for planned in runs:
            state = "done" if cell_files.finished(planned) else "to run"
            state = "diverged before: to run again" if cell_files.diverged(planned) else state
            print(f"  {planned.cell.name} seed {planned.seed}: {state}", flush=True)
        if launcher.name == "submitit":
            print(describe_jobs([p.prepared for p in runs if not cell_files.finished(p)], store), flush=True)
        return []
    # One writer per ablation folder and per store (askexpert/runs/lock.py); the cells' pipelines run inside.
    with locked(out), store.locked():
        return _run_all(args, spec, runs, store, out, launcher)


def _train_on_cluster(runs: list[PlannedRun], store: StageStore, out: str, launcher) -> Any:
    """With the submitit launcher: every stage of the unfinished runs as jobs first (the runs' own folders are
    made ready for them); None with the local launcher."""
    if launcher.name != "submitit":
        return None
    todo = [p.prepared for p in runs if not cell_files.finished(p)]
    outcome = train_on_cluster(todo, store, launcher, (out, store.root))
    for prepared in todo:
        record_outcome(prepared, store, outcome)
    return outcome


def _run_all(args, spec: dict, runs: list[PlannedRun], store: StageStore, out: str, launcher) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    if args.overwrite:
        _remove_stale(out, runs)
    write_json(os.path.join(out, SPEC_FILE), spec, indent=2, default=str)
    jobs = _train_on_cluster(runs, store, out, launcher)
    if jobs is not None and jobs.running:
        return []  # --launcher.wait false: submitted; the same command evaluates once they are done
    failed_jobs: list[str] = []  # runs whose stage job failed (not diverged): they have no result
    records = []
    diverged: dict[str, dict] = {}  # identity of a stage that diverged in this process -> where
    for number, planned in enumerate(runs, 1):
        header = f"[ablate {number}/{len(runs)}] {planned.cell.name} seed {planned.seed}"
        found = cell_files.finished(planned)
        if found:
            print(f"{header}: done, skipped", flush=True)
            records.append(found)
            continue
        shared = next((diverged[s.identity] for s in planned.prepared.stages if s.identity in diverged), None)
        if shared is not None:
            print(f"{header}: diverged (shares stage {shared['stage']}, which diverged), skipped", flush=True)
            cell_files.record_divergence(planned, shared)
            cell_files.write_results(out, args, runs)
            continue
        problem = jobs.problem(stage_keys(planned.prepared, store)) if jobs is not None else None
        divergence = jobs.divergence(stage_keys(planned.prepared, store)) if jobs is not None else None
        if divergence is not None:
            print(f"{header}: DIVERGED at stage {divergence['stage']}, step {divergence['step']}; going on", flush=True)
            cell_files.record_divergence(planned, divergence)
            cell_files.write_results(out, args, runs)
            continue
        if problem is not None:
            print(f"{header}: not evaluated: {problem}", flush=True)
            failed_jobs.append(f"{planned.cell.name} seed {planned.seed}")
            continue
        print(f"{header}: running ({planned.folder})", flush=True)
        try:
            record = run_cell(planned, store)
        except DivergenceError as err:
            stage = next(s for s in planned.prepared.stages if s.name == err.stage)
            diverged[stage.identity] = {"stage": err.stage, "step": err.step, "epoch": err.epoch, "message": str(err)}
            cell_files.record_divergence(planned, diverged[stage.identity])
            print(f"{header}: DIVERGED at stage {err.stage}, step {err.step} (epoch {err.epoch}); going on", flush=True)
            cell_files.write_results(out, args, runs)
            continue
        first = record["rows"][0] if record["rows"] else {}
        if first:
            print(
                f"{header}: system acc {100 * first['system_acc']:.2f} % at {100 * first['offload_ratio']:.1f} % "
                f"offload; experts on own classes "
                f"{100 * sum(r['subset_test_acc'] for r in record['rows']) / len(record['rows']):.2f} %",
                flush=True,
            )
        records.append(record)
        cell_files.write_results(out, args, runs)
    paths = cell_files.write_results(out, args, runs)
    failed = [f"{p.cell.name} seed {p.seed}" for p in runs if cell_files.diverged(p)]
    if paths:
        print(f"\nresults: {paths['results.csv']}, {paths['results.md']}, {paths['results.png']}", flush=True)
        with open(paths["results.md"], encoding="utf-8") as handle:
            print(handle.read(), flush=True)
    if failed_jobs:  # a stage's job failed: those runs are listed, the others finished and are in the results
        raise UserError(
            f"{len(failed_jobs)} of {len(runs)} runs could not finish because a stage job failed "
            f"({'; '.join(failed_jobs)}); the others are in results.md; rerun the same command to retry them"
        )
    if failed:  # the other runs finished and are in the results; the exit status says the grid is not whole
        raise RunsDivergedError(
            f"{len(failed)} of {len(runs)} runs diverged ({'; '.join(failed)}): the others finished, every run is "
            "listed in results.md; rerun with a changed config to train the diverged ones again"
        )
    return records

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

from askexpert.ablation import claims, results
from askexpert.ablation import grid as grids
from askexpert.ablation.store import StageStore
from askexpert.errors import DivergenceError, RunsDivergedError, UserError, find_user_error
from askexpert.files.atomic import atomic_write_text, write_json
from askexpert.pipeline.prepare import prepare
from askexpert.pipeline.runner import execute
from askexpert.pipeline.settings import expert_count, find_config_file, parse_settings
from askexpert.runs.lock import LOCK_FILE, locked

SPEC_FILE = "ablation.json"
CELL_FILE = "cell.json"


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
    argv = ["--config", pipeline_path, *fixed_args, *cell_args, "--out", folder, "--seed", str(seed)]
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


def _load_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def check_out_folder(out: str, spec: dict, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    saved_path = os.path.join(out, SPEC_FILE)
    saved = _load_json(saved_path)
    if saved is None:
        if os.path.isdir(out) and set(os.listdir(out)) - {LOCK_FILE}:
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
                prepared = prepare(settings, args.overwrite, cache, explicit, args.dry_run, own_files=(CELL_FILE,))
            except Exception as err:
                found = find_user_error(err)
                if found is None:
                    raise
                values = ", ".join(f"{k}={v}" for k, v in cell.columns().items())
                raise UserError(f"cell {values or 'default'} (seed {seed}): {found}") from None
            identity = _cell_identity(prepared)
            saved = _load_json(os.path.join(folder, CELL_FILE))
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


def _saved(planned: PlannedRun) -> dict | None:
    """The cell's record when it was made with this cell's config (finished or diverged)."""
    saved = _load_json(os.path.join(planned.folder, CELL_FILE))
    return saved if saved and saved.get("identity") == planned.identity else None


def _finished(planned: PlannedRun) -> dict | None:
    saved = _saved(planned)
    return saved if saved and not saved.get("diverged") else None


def _diverged(planned: PlannedRun) -> dict | None:
    saved = _saved(planned)
    return saved if saved and saved.get("diverged") else None


def record_divergence(planned: PlannedRun, divergence: dict) -> dict:
    """cell.json of a cell that could not finish because one of its stages diverged (no result rows)."""
    record = {
        "cell": planned.cell.columns(),
        "seed": planned.seed,
        "identity": planned.identity,
        "diverged": divergence,
        "rows": [],
    }
    write_json(os.path.join(planned.folder, CELL_FILE), record, indent=1, default=str)
    return record


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
    write_report(report, planned.folder)
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
    write_json(os.path.join(planned.folder, CELL_FILE), record, indent=1, default=str)
    return record


def write_results(out: str, args, runs: list[PlannedRun]) -> dict[str, str] | None:
    """results.csv, .md and .png from every finished cell (in grid order); None before the first one."""
    records = [r for r in (_finished(p) for p in runs) if r]
    diverged = [r for r in (_diverged(p) for p in runs) if r]
    if not records and not diverged:
        return None
    columns = [grids.column(k) for k in args.grid]
    rows = [row for record in records for row in record["rows"]]
    paths = {name: os.path.join(out, name) for name in ("results.csv", "results.md", "results.png")}
    atomic_write_text(paths["results.csv"], results.csv_text(rows, results.header(columns, rows)))
    aggregated = results.aggregate(rows, columns)
    stand_in = any(r["stand_in"] for r in records) or not records
    label = "STAND-IN synthetic data, not CIFAR-100" if stand_in else "real data"
    done = f"{len(records)} of {len(runs)} runs finished" + (f", {len(diverged)} diverged" if diverged else "")
    text = [
        f"# Ablation results ({label})",
        "",
        f"Grid: {', '.join(columns) or 'none'}; seeds {', '.join(str(s) for s in args.seeds)}; {done}. "
        "Mean ± sample std over seeds; expert columns are first averaged over a run's experts.",
        "",
        results.markdown_table(aggregated, columns) if rows else "No run has finished yet.",
        "",
    ]
    claims_table = claims.markdown(rows, columns) if rows else None
    if claims_table:
        text += ["## The paper's claims, measured in these runs", "", claims_table, ""]
    if diverged:
        text += ["## Diverged runs", "", "Training produced a non-finite loss; these runs have no results.", ""]
        text += ["| cell | seed | stage | step | epoch |", "|---|---:|---|---:|---:|"]
        for record in diverged:
            cell = ", ".join(f"{k}={v}" for k, v in record["cell"].items()) or "default"
            d = record["diverged"]
            text.append(f"| {cell} | {record['seed']} | {d['stage']} | {d['step']} | {d['epoch']} |")
        text.append("")
    atomic_write_text(paths["results.md"], "\n".join(text))
    if rows:
        results.plot(aggregated, columns, paths["results.png"], f"{os.path.basename(out)} ({label}; {done})")
    return paths


def run(argv: list[str]) -> list[dict]:
    args = parser().parse_args(argv)
    spec, runs, store = plan(args)
    out = os.path.abspath(args.out)
    print(f"ablation: {describe_plan(runs, store)}", flush=True)
    if args.dry_run:
        for planned in runs:
            state = "done" if _finished(planned) else "to run"
            state = "diverged before: to run again" if _diverged(planned) else state
            print(f"  {planned.cell.name} seed {planned.seed}: {state}", flush=True)
        return []
    # One writer per ablation folder and per store (askexpert/runs/lock.py); the cells' pipelines run inside.
    with locked(out), store.locked():
        return _run_all(args, spec, runs, store, out)


def _run_all(args, spec: dict, runs: list[PlannedRun], store: StageStore, out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    if args.overwrite:
        _remove_stale(out, runs)
    write_json(os.path.join(out, SPEC_FILE), spec, indent=2, default=str)
    records = []
    diverged: dict[str, dict] = {}  # identity of a stage that diverged in this process -> where
    for number, planned in enumerate(runs, 1):
        header = f"[ablate {number}/{len(runs)}] {planned.cell.name} seed {planned.seed}"
        found = _finished(planned)
        if found:
            print(f"{header}: done, skipped", flush=True)
            records.append(found)
            continue
        shared = next((diverged[s.identity] for s in planned.prepared.stages if s.identity in diverged), None)
        if shared is not None:
            print(f"{header}: diverged (shares stage {shared['stage']}, which diverged), skipped", flush=True)
            record_divergence(planned, shared)
            write_results(out, args, runs)
            continue
        print(f"{header}: running ({planned.folder})", flush=True)
        try:
            record = run_cell(planned, store)
        except DivergenceError as err:
            stage = next(s for s in planned.prepared.stages if s.name == err.stage)
            diverged[stage.identity] = {"stage": err.stage, "step": err.step, "epoch": err.epoch, "message": str(err)}
            record_divergence(planned, diverged[stage.identity])
            print(f"{header}: DIVERGED at stage {err.stage}, step {err.step} (epoch {err.epoch}); going on", flush=True)
            write_results(out, args, runs)
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
        write_results(out, args, runs)
    paths = write_results(out, args, runs)
    failed = [f"{p.cell.name} seed {p.seed}" for p in runs if _diverged(p)]
    if paths:
        print(f"\nresults: {paths['results.csv']}, {paths['results.md']}, {paths['results.png']}", flush=True)
        with open(paths["results.md"], encoding="utf-8") as handle:
            print(handle.read(), flush=True)
    if failed:  # the other runs finished and are in the results; the exit status says the grid is not whole
        raise RunsDivergedError(
            f"{len(failed)} of {len(runs)} runs diverged ({'; '.join(failed)}): the others finished, every run is "
            "listed in results.md; rerun with a changed config to train the diverged ones again"
        )
    return records

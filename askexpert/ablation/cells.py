"""An ablation's cell records (`cell.json` in each (cell, seed) run folder: its result rows, or where it
diverged) and the results files made from all of them (results.csv, .md, .png), rewritten after every cell."""

from __future__ import annotations

import json
import os

from askexpert.ablation import claims, results
from askexpert.ablation import grid as grids
from askexpert.files.atomic import atomic_write_text, write_json

CELL_FILE = "cell.json"


def load_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def saved_record(planned) -> dict | None:
    """The cell's record when it was made with this cell's config (finished or diverged)."""
    saved = load_json(os.path.join(planned.folder, CELL_FILE))
    return saved if saved and saved.get("identity") == planned.identity else None


def finished(planned) -> dict | None:
    saved = saved_record(planned)
    return saved if saved and not saved.get("diverged") else None


def diverged(planned) -> dict | None:
    saved = saved_record(planned)
    return saved if saved and saved.get("diverged") else None


def record_divergence(planned, divergence: dict) -> dict:
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


def write_results(out: str, args, runs: list) -> dict[str, str] | None:
    """results.csv, .md and .png from every finished cell (in grid order); None before the first one."""
    records = [r for r in (finished(p) for p in runs) if r]
    stopped = [r for r in (diverged(p) for p in runs) if r]
    if not records and not stopped:
        return None
    columns = [grids.column(k) for k in args.grid]
    rows = [row for record in records for row in record["rows"]]
    paths = {name: os.path.join(out, name) for name in ("results.csv", "results.md", "results.png")}
    atomic_write_text(paths["results.csv"], results.csv_text(rows, results.header(columns, rows)))
    aggregated = results.aggregate(rows, columns)
    stand_in = any(r["stand_in"] for r in records) or not records
    label = "STAND-IN synthetic data, not CIFAR-100" if stand_in else "real data"
    done = f"{len(records)} of {len(runs)} runs finished" + (f", {len(stopped)} diverged" if stopped else "")
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
    if stopped:
        text += ["## Diverged runs", "", "Training produced a non-finite loss; these runs have no results.", ""]
        text += ["| cell | seed | stage | step | epoch |", "|---|---:|---|---:|---:|"]
        for record in stopped:
            cell = ", ".join(f"{k}={v}" for k, v in record["cell"].items()) or "default"
            d = record["diverged"]
            text.append(f"| {cell} | {record['seed']} | {d['stage']} | {d['step']} | {d['epoch']} |")
        text.append("")
    atomic_write_text(paths["results.md"], "\n".join(text))
    if rows:
        results.plot(aggregated, columns, paths["results.png"], f"{os.path.basename(out)} ({label}; {done})")
    return paths

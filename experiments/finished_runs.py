"""What the evidence analyses (misrouting.py, routing_search.py, cost_projection.py) share: their command line,
an ablation's finished cells, a finished run opened with the static experts trained beside its own, and the
OUT.json / OUT.md pair each writes for results_doc.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def arguments(doc: str, out_name: str) -> argparse.Namespace:
    """An analysis's command line: the evidence ablation it reads, and OUT (default docs/results/<out_name>)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--ablation", default=str(REPO / "runs" / "ablations" / "evidence"), help="ablation folder")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / out_name), help="writes OUT.json and OUT.md")
    return parser.parse_args()


def finished_cells(ablation: Path) -> list[tuple[dict, int, Path]]:
    """(grid values, seed, run folder) of every finished cell of an ablation (a diverged cell has no rows)."""
    if not (ablation / "cells").is_dir():
        raise SystemExit(f"{ablation} is not an ablation's folder (no cells/): run `make evidence` first")
    found = []
    for path in sorted((ablation / "cells").glob("*/seed*/cell.json")):
        try:
            record = json.loads(path.read_text())
            if record.get("rows"):
                found.append((dict(record["cell"]), int(record["seed"]), path.parent))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SystemExit(f"{path} is not a finished cell's record ({type(err).__name__}: {err})") from None
    return found


def load_compared_run(folder: Path):
    """(its saved settings, the loaded run) of a finished run that trained static experts beside its own, with
    cached logits (no model runs once they exist); None for any other run."""
    from askexpert.collab.evaluation import load_run
    from askexpert.errors import UserError
    from askexpert.pipeline.finished_run import read_settings
    from askexpert.pipeline.settings import recorded_profile
    from askexpert.runs.layout import STATIC, RunLayout

    try:
        settings = read_settings(str(folder))
        if settings.specialization == STATIC or not settings.static_baseline:
            return None
        layout = RunLayout(str(folder), shared_logits=(folder / "logits").is_symlink())
        profile = recorded_profile(str(folder), settings.profile)
        run = load_run(layout, settings.data.as_dict(), settings.specialization, settings.static_baseline, profile)
    except UserError as err:  # a run folder that is not (or no longer) a finished run
        raise SystemExit(f"{folder}: {err}") from None
    return settings, run


def write_tables(out: str, data, markdown: str) -> None:
    """OUT.json (the figures) and OUT.md (the table results_doc.py puts into docs/results.md), echoed."""
    from askexpert.files.atomic import write_json

    path = Path(out)
    try:
        write_json(path.with_suffix(".json"), data)
        path.with_suffix(".md").write_text(markdown + "\n")
    except OSError as err:
        raise SystemExit(f"cannot write {path}.json/.md: {err.strerror}") from None
    print(markdown)
    print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")

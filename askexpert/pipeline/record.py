"""stages.json: a run's record of its stages, each with its identity, resolved config, whether it is done,
where it diverged, when it started and how long it took.

The pipeline reads it to skip, resume or refuse a stage; `evaluate`, `route` and `export` read it to refuse a
run that has no result (`check_finished`). Its bytes are part of a run (indent 2, sorted keys, one newline).
"""

from __future__ import annotations

import json
import os
import time

from askexpert.errors import DivergenceError, UserError
from askexpert.files.atomic import write_json
from askexpert.runs.layout import RunLayout

STAGES_FILE = "stages.json"


def stages_file(layout: RunLayout) -> str:
    return os.path.join(layout.root, STAGES_FILE)


def load_record(layout: RunLayout) -> dict:
    path = stages_file(layout)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    # a mapping of stage name -> a mapping per stage; anything else was not written by askexpert
    if not isinstance(record, dict) or not all(isinstance(entry, dict) for entry in record.values()):
        raise UserError(f"{path} is damaged; use --overwrite to start this run again")
    return record


def save_record(layout: RunLayout, record: dict) -> None:
    write_json(stages_file(layout), record, indent=2, sort_keys=True)


def check_finished(layout: RunLayout) -> None:
    """Refuse a run whose stages did not all finish (one diverged, or it was interrupted): its models would make
    a report that looks like a result."""
    for name, entry in load_record(layout).items():
        if entry.get("diverged"):
            found = entry["diverged"]
            raise UserError(
                f"stage {name} of {layout.root} diverged (step {found.get('step')}, epoch {found.get('epoch')}), so "
                "the run has no result; rerun the pipeline with a changed config for that stage"
            )
        if not entry.get("done"):
            raise UserError(f"stage {name} of {layout.root} has not finished; rerun the pipeline to finish it")


def is_done(entry: dict, identity: str) -> bool:
    """Whether a stage's entry says it finished with the config of `identity`."""
    return bool(entry.get("identity") == identity and entry.get("done"))


def started_entry(identity: str, config: dict, resumed: bool) -> dict:
    """The entry of a stage that starts training now. `started`: the wall-clock start of the process run that
    trains it; a resumed stage's `seconds` count from its resume only (the time before an interruption is not
    known), so it says it resumed."""
    entry = {"identity": identity, "done": False, "config": config, "started": time.time()}
    if resumed:
        entry["resumed"] = True
    return entry


def mark_done(entry: dict) -> None:
    entry["done"] = True
    if "started" in entry:  # the minutes a stage costs, for the docs' "minutes per seed" (stages.json)
        entry["seconds"] = round(time.time() - entry["started"], 1)


def mark_diverged(entry: dict, err: DivergenceError) -> None:
    """A diverged stage is not done: a new config for it may replace it without --overwrite."""
    entry["diverged"] = {"step": err.step, "epoch": err.epoch, "last_good": err.last_good}

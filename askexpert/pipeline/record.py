"""stages.json: a run's record of its stages, each with its identity, resolved config, whether it is done,
where it diverged, by which signal it was interrupted, when it started and how long it took.

The pipeline reads it to skip, resume or refuse a stage; `evaluate`, `route` and `export` read it to refuse a
run that has no result (`check_finished`), and to check the run's pipeline.yaml against it. It is checked when
read (`load_record`); a damaged one is repaired by `--overwrite true`, which its error names. Its bytes are part
of a run (indent 2, sorted keys, one newline).
"""

from __future__ import annotations

import math
import os
import signal
import time

from askexpert.errors import DivergenceError, UserError
from askexpert.files.atomic import write_json
from askexpert.files.reading import DamagedFile, read_json_file
from askexpert.runs.layout import RunLayout

STAGES_FILE = "stages.json"


def stages_file(layout: RunLayout) -> str:
    return os.path.join(layout.root, STAGES_FILE)


# The type of each key that decides what becomes of a stage (skipped, resumed, trained again, refused by the
# commands that read the run): one of another type makes the file damaged.
ENTRY_TYPES: dict[str, type] = {
    "identity": str,
    "done": bool,
    "config": dict,
    "interrupted": str,
    "diverged": dict,
    "failed": str,
    "not_started": str,
}
# What a stage cost (a finite number >= 0, or a flag): only reported. One askexpert cannot have written now (a
# negative time from before writes were clamped, when the wall clock stepped back; a NaN; a text) is dropped when
# read, not fatal: the repair a damaged file names, --overwrite, would train every stage again for a figure.
TIMING_TYPES: dict[str, type | tuple[type, ...]] = {
    "started": (int, float),
    "seconds": (int, float),
    "side_by_side": int,
    "resumed": bool,
}
REQUIRED_KEYS = ("done",)  # what every reader asks of an entry


class DamagedRecord(UserError):
    """stages.json is not what askexpert writes; `--overwrite true` (which trains every stage again) repairs it."""


def load_record(layout: RunLayout, overwrite: bool = False) -> dict:
    """The run's stages.json ({} before its first stage), checked: a mapping of stage name -> entry, each entry's
    keys of the types askexpert writes. A damaged file is refused with the command that repairs it; with
    `overwrite` (that command) it reads as no record: every stage trains again and the file is written anew."""
    path = stages_file(layout)
    if not os.path.isfile(path):
        return {}
    try:
        return _checked_record(path)
    except DamagedRecord:
        if overwrite:
            return {}
        raise


def _checked_record(path: str) -> dict:
    try:
        record = read_json_file(path)
    except DamagedFile as err:
        raise _damaged(path, err.reason) from None
    if not isinstance(record, dict):
        raise _damaged(path, f"a {type(record).__name__} instead of a mapping of stages")
    for name, entry in record.items():
        if not isinstance(entry, dict):
            raise _damaged(path, f"stage {name!r} is a {type(entry).__name__}, not a mapping")
        for key in REQUIRED_KEYS:
            if key not in entry:
                raise _damaged(path, f"stage {name!r} has no {key!r}")
        for key, expected in ENTRY_TYPES.items():
            if key in entry and not _valid(entry[key], expected):
                raise _damaged(path, f"stage {name!r} has {key} {entry[key]!r}")
        for key, expected in TIMING_TYPES.items():
            if key in entry and not _valid(entry[key], expected):
                del entry[key]
    return record


def _valid(value, expected: type | tuple[type, ...]) -> bool:
    """Of the type askexpert writes; a number (a time, a count) also finite and not negative."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):  # bool is an int in Python: a time or a count that is true or false is invalid too
        return bool in types
    if isinstance(value, (int, float)):
        return isinstance(value, types) and math.isfinite(value) and value >= 0
    return isinstance(value, types)


def _damaged(path: str, reason: str) -> DamagedRecord:
    return DamagedRecord(
        f"{path} is damaged; use --overwrite true with the `pipeline` (or `ablate`) command that made the run to "
        f"train its stages again and write it anew (found: {reason})"
    )


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
        if entry.get("interrupted") and not entry.get("done"):
            raise UserError(
                f"stage {name} of {layout.root} was interrupted ({entry['interrupted']}); rerun the pipeline "
                "with the same command to resume it"
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
        # never negative: the wall clock may step back (NTP) while a stage trains
        entry["seconds"] = max(0.0, round(time.time() - entry["started"], 1))


def mark_interrupted(entry: dict, signum: int) -> None:
    """A stage stopped by SIGTERM or SIGINT is not done: the pipeline run again resumes it from its last.ckpt."""
    entry["interrupted"] = signal.Signals(signum).name


def mark_diverged(entry: dict, err: DivergenceError) -> None:
    """A diverged stage is not done: a new config for it may replace it without --overwrite."""
    entry["diverged"] = {"step": err.step, "epoch": err.epoch, "last_good": err.last_good}

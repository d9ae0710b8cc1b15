"""A run's report.json read back: the one reader, checked by type and range once, here.

`route`, `export` (the operating point and the model card), `adapt` and every other reader take the report
from `read_report`, so none of them meets a threshold of 5, a temperature of 0 or a NaN: the router would
offload everything, or answer the first class for every image. A damaged report is refused in one line that
names the file, the field and the command that writes it again (`evaluate --run RUN`).
"""

from __future__ import annotations

import os

from askexpert.collab.budgets import BUDGETS, check_limit
from askexpert.collab.routing import FUSIONS, GATES, SECOND_FUSIONS, check_seed
from askexpert.errors import UserError
from askexpert.files.fields import BadField, choice, field, flag, mapping, number, sequence, whole
from askexpert.files.reading import DamagedFile, read_json_file

REPORT_FILE = "report.json"
# the figures of an operating point that a reader shows or compares: shares of images, or costs
SHARES = ("acc", "offload_ratio", "routing_acc", "second_ratio")
COSTS = ("latency_ms", "energy_mj", "system_energy_mj")
# the report's sections that readers open as mappings (the model card shows what they hold)
SECTIONS = ("data", "generalist", "base", "partition", "baselines", "costs", "provenance", "calibration")


def report_path(run_dir: str) -> str:
    return os.path.join(run_dir, REPORT_FILE)


def read_report(run_dir: str) -> dict:
    """`run_dir`'s report.json, refused in one line unless every field a reader uses is in its range."""
    path = report_path(run_dir)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no report.json yet: finish it with `python -m askexpert pipeline` first")
    rewrite = f"write it again with `python -m askexpert evaluate --run {run_dir}`"
    try:
        report = read_json_file(path)
    except DamagedFile as err:
        raise UserError(f"{err}; {rewrite}") from None
    try:
        check_report(report)
    except BadField as err:
        raise UserError(f"{path} is damaged: {err}; {rewrite}") from None
    return report


def check_report(report) -> None:
    """Raise BadField for the first field of a parsed report.json that is out of its type or range."""
    report = mapping(report, "the report")
    for section in SECTIONS:
        if report.get(section) is not None:
            mapping(report[section], section)
    num_classes = whole((report.get("data") or {}).get("num_classes", 2), "data.num_classes", 2)
    _routing(mapping(field(report, "routing", ""), "routing"), num_classes)
    _point(field(report, "selected", ""), "selected")
    if report.get("second_expert") is not None:
        _pair(report["second_expert"], "second_expert")
    constrained = report.get("constrained")
    if constrained is not None:
        _point(constrained, "constrained")
        if constrained.get("second_expert") is not None:
            _pair(constrained["second_expert"], "constrained.second_expert")
    for key in ("experts", "static_experts", "findings"):
        for i, entry in enumerate(sequence(report.get(key) or [], key)):
            mapping(entry, f"{key}[{i}]")


def _routing(routing: dict, num_classes: int) -> None:
    choice(field(routing, "gate", "routing."), "routing.gate", GATES)
    whole(field(routing, "top_k", "routing."), f"routing.top_k ({num_classes} classes)", 1, num_classes)
    flag(field(routing, "temperature", "routing."), "routing.temperature")
    number(field(routing, "temperature_value", "routing."), "routing.temperature_value", 0.0, above=True)
    choice(field(routing, "fusion", "routing."), "routing.fusion", FUSIONS)
    if routing.get("threshold") is not None:
        number(routing["threshold"], "routing.threshold", 0.0, 1.0)
    for key in ("budget", "constrained"):
        for limit, value in mapping(routing.get(key) or {}, f"routing.{key}").items():
            if limit not in BUDGETS:
                raise BadField(f"routing.{key} has an unknown limit {limit!r} (limits: {', '.join(BUDGETS)})")
            if value is not None:
                check_limit(limit, value, f"routing.{key}.{limit}")
    if "seed" in routing:
        check_seed(routing["seed"])


def _point(point, name: str) -> dict:
    """An operating point: its threshold, and the figures readers show."""
    point = mapping(point, name)
    number(field(point, "threshold", f"{name}."), f"{name}.threshold", 0.0, 1.0)
    for key in SHARES + COSTS:
        if point.get(key) is not None:
            number(point[key], f"{name}.{key}", 0.0, 1.0 if key in SHARES else float("inf"))
    return point


def _pair(point, name: str) -> None:
    """A two-expert operating point: a point, with the margin and the fusion of the two experts' answers."""
    point = _point(point, name)
    number(field(point, "margin", f"{name}."), f"{name}.margin", 0.0, 1.0)
    choice(field(point, "fusion", f"{name}."), f"{name}.fusion", SECOND_FUSIONS)

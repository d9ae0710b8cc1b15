"""The limits an operating point may have (offload ratio, latency, edge energy): checked, and shown to a person.

Torch-free on purpose: the ablation's result tables and the docs script read budgets without the training stack.
"""

from __future__ import annotations

import math

from askexpert.errors import UserError
from askexpert.files.fields import BadField, number

BUDGETS = ("offload_ratio", "latency_ms", "energy_mj")


def check_limit(key: str, value, label: str) -> float:
    """One limit (`key` one of BUDGETS) of a budget, by the one rule both `--routing.budget.*` and a report.json
    read back follow, so that askexpert never writes a report it then refuses: a finite number (an infinite
    limit is no limit: leave it unset), in [0, 1] for the offload ratio, at least 0 for a cost. Raises BadField
    naming the value as `label`."""
    return number(value, label, 0.0, 1.0 if key == "offload_ratio" else math.inf)


def check_budget(budget: dict[str, float | None] | None, name: str = "budget") -> dict[str, float]:
    """The limits that are set; `name` is the option they came from (routing.budget or routing.constrained)."""
    active = {key: value for key, value in (budget or {}).items() if value is not None}
    for key, value in active.items():
        if key not in BUDGETS:
            raise UserError(f"unknown {name} {key!r}; limits: {', '.join(BUDGETS)}")
        try:
            check_limit(key, value, f"{name} {key}")
        except BadField as err:
            raise UserError(str(err)) from None
    return active


def limits_text(limits: dict) -> str:
    """A budget as a person reads it, e.g. `offload <= 20 %, latency <= 3 ms`."""
    shown = {
        "offload_ratio": ("offload", 100, " %"),
        "latency_ms": ("latency", 1, " ms"),
        "energy_mj": ("edge energy", 1, " mJ"),
    }
    return ", ".join(f"{shown[k][0]} <= {shown[k][1] * v:g}{shown[k][2]}" for k, v in limits.items())

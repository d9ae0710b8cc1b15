"""The limits an operating point may have (offload ratio, latency, edge energy): checked, and shown to a person.

Torch-free on purpose: the ablation's result tables and the docs script read budgets without the training stack.
"""

from __future__ import annotations

from askexpert.errors import UserError

BUDGETS = ("offload_ratio", "latency_ms", "energy_mj")


def check_budget(budget: dict[str, float | None] | None, name: str = "budget") -> dict[str, float]:
    """The limits that are set; `name` is the option they came from (routing.budget or routing.constrained)."""
    active = {key: value for key, value in (budget or {}).items() if value is not None}
    for key, value in active.items():
        if key not in BUDGETS:
            raise UserError(f"unknown {name} {key!r}; limits: {', '.join(BUDGETS)}")
        if value < 0 or (key == "offload_ratio" and value > 1):
            raise UserError(
                f"{name} {key} must be {'in [0, 1]' if key == 'offload_ratio' else 'non-negative'}, got {value}"
            )
    return active


def limits_text(limits: dict) -> str:
    """A budget as a person reads it, e.g. `offload <= 20 %, latency <= 3 ms`."""
    shown = {
        "offload_ratio": ("offload", 100, " %"),
        "latency_ms": ("latency", 1, " ms"),
        "energy_mj": ("edge energy", 1, " mJ"),
    }
    return ", ".join(f"{shown[k][0]} <= {shown[k][1] * v:g}{shown[k][2]}" for k, v in limits.items())

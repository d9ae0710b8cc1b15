"""One round measured: the system with the current generalist, τ chosen again on validation, scored on test.

The experts, the base model and the cost model are the run's own (their cached logits, `load_run`); only the
generalist's logits are new. τ (and the temperature) are chosen on the validation split, never on the
calibration split, which may be the very stream the generalist just learnt from (`stream.py`). Round 0 is
measured the same way from the run's cached logits, so every row of adapt.csv is comparable.

Two operating points per round:
- `selected`: the run's own rule (the most accurate τ on validation, within the run's routing budget);
- `equal accuracy` (eq_*): the τ that offloads least while its validation accuracy is still at least round 0's
  at its selected point. This is the point the claim is about: "the offload ratio falls round after round at equal
  or better accuracy". When no τ reaches round 0's accuracy, the most accurate one is taken and `eq_reached` says
  so.
"""

from __future__ import annotations

import torch

from askexpert.collab.evaluation import LoadedRun
from askexpert.collab.report_file import read_report
from askexpert.collab.sweep import at_mask, sweep
from askexpert.collab.system import Budget, CollaborativeSystem, RoutingConfig, selection_grid
from askexpert.errors import UserError

SPLITS = ("val", "test")
POINT = ("acc", "offload_ratio", "latency_ms", "energy_mj", "system_energy_mj")


POINTS = ("selected", "constrained")


def run_routing(run_dir: str, point: str = "selected") -> RoutingConfig:
    """The routing the run's report was made with (gate, top-k, temperature scaling, fusion, budget), τ left to
    be chosen: what `route` and `export` use, read from report.json (a later `evaluate` may have changed it).
    `point` is the operating point the deployment runs at: `selected` (the run's budget) or `constrained` (its
    `routing.constrained` limits become the budget: a near-edge that takes at most so much)."""
    if point not in POINTS:
        raise UserError(f"unknown --point {point!r}; points: {', '.join(POINTS)}")
    routing = read_report(run_dir)["routing"]  # checked by type and range there
    limits = routing.get("budget") or {}
    if point == "constrained":
        limits = routing.get("constrained") or {}
        if not limits:
            raise UserError(
                f"{run_dir} was evaluated without a constrained point: --point constrained needs "
                "`evaluate --run RUN --routing.constrained.offload_ratio ...` first"
            )
    return RoutingConfig(
        gate=routing["gate"],
        threshold=None,
        top_k=routing["top_k"],
        temperature=routing["temperature"],
        fusion=routing["fusion"],
        budget=Budget(**limits),
        seed=routing.get("seed", 0),
    )


def system_with(run: LoadedRun, generalist_logits: dict[str, torch.Tensor]) -> CollaborativeSystem:
    """The run's system on val and test with `generalist_logits` ({"val", "test"}) as the generalist."""
    labels = run.generalist["labels"]
    return CollaborativeSystem(
        generalist={split: generalist_logits[split] for split in SPLITS},
        labels={split: labels[split] for split in SPLITS},  # no calib: τ is chosen on validation (module doc)
        coverage=run.partition.coverage(),
        experts=run.expert_set(run.specialization),
        cost_model=run.cost_model,
        generalist_cost=run.model_cost(run.generalist["meta"]),
        base={split: run.base["logits"][split] for split in SPLITS},
        base_cost=run.model_cost(run.base["meta"]),
    )


def least_offload_at(table: dict[str, torch.Tensor], target: float) -> tuple[int, bool]:
    """(index of the τ offloading least with accuracy >= `target`, whether any reaches it); else the most
    accurate τ (ties: the one offloading least)."""
    reached = table["acc"] >= target - 1e-12
    if not reached.any():
        reached = table["acc"] >= table["acc"].max() - 1e-12
        return int(torch.nonzero(reached).flatten()[table["offload_ratio"][reached].argmin()]), False
    candidates = torch.nonzero(reached).flatten()
    return int(candidates[table["offload_ratio"][candidates].argmin()]), True


def measure(system: CollaborativeSystem, routing: RoutingConfig, target_val_acc: float | None) -> dict:
    """The round's figures (module docstring); `target_val_acc`: round 0's validation accuracy at its selected
    point (None: this is round 0, its own)."""
    report = system.evaluate(routing)
    selected, temperature = report["selected"], float(report["routing"]["temperature_value"])
    val_acc = float(report["calibration"]["selected"]["acc"])
    target = val_acc if target_val_acc is None else target_val_acc
    val, *_ = system.route("val", routing, temperature)
    table = sweep(val, selection_grid(val.confidence))
    index, reached = least_offload_at(table, target)
    eq_tau = float(table["threshold"][index])
    test, *_ = system.route("test", routing, temperature)
    eq = at_mask(test, test.confidence < eq_tau)
    labels = system.labels["test"]
    return {
        "tau": float(selected["threshold"]),
        "temperature": temperature,
        **{key: float(selected[key]) for key in POINT},
        "routing_acc": selected.get("routing_acc"),
        "val_acc": val_acc,
        "generalist_acc": float((system.generalist["test"].argmax(-1) == labels).double().mean()),
        "eq_tau": eq_tau,
        "eq_target_val_acc": target,
        "eq_val_acc": float(table["acc"][index]),
        "eq_reached": reached,
        **{f"eq_{key}": float(eq[key]) for key in POINT},
    }

"""Accuracy, offload ratio, latency and energy for every routing threshold at once.

Which expert a sample would go to does not depend on the threshold, only *whether* it goes. So each sample
is reduced to: its confidence, whether the edge answer is right, whether the offloaded answer is right, and
what offloading it adds in latency and energy. Sorting the samples by confidence turns "offload every sample
below tau" into a prefix of that order, and cumulative sums give every threshold's totals in one
`searchsorted`: O(N log N + T) instead of O(N x T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from askexpert.collab.budgets import check_budget
from askexpert.collab.costs import SampleCosts
from askexpert.errors import UserError

METRICS = ("threshold", "offload_ratio", "acc", "latency_ms", "energy_mj", "system_energy_mj")


@dataclass
class RoutedSamples:
    """Everything the sweep needs about N samples (the cached models' answers, reduced)."""

    confidence: torch.Tensor  # (N,) gate value; +inf for a sample that cannot be offloaded (no expert)
    edge_correct: torch.Tensor  # (N,) bool
    offload_correct: torch.Tensor  # (N,) bool: the answer after offloading (expert + fusion) is right
    offload_latency_ms: torch.Tensor  # (N,) what offloading adds
    offload_energy_mj: torch.Tensor  # (N,) edge device
    offload_system_energy_mj: torch.Tensor  # (N,) edge + near-edge
    edge: SampleCosts  # what every sample costs on the edge first

    def __len__(self) -> int:
        return len(self.confidence)


def default_thresholds(steps: int = 101) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def sweep(samples: RoutedSamples, thresholds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every metric of `METRICS` for every threshold (a sample is offloaded iff confidence < threshold)."""
    thresholds = default_thresholds() if thresholds is None else thresholds.to(torch.float64)
    n = len(samples)
    if n == 0:
        raise UserError("nothing to evaluate: the split is empty")
    order = samples.confidence.to(torch.float64).argsort()
    sorted_conf = samples.confidence.to(torch.float64)[order]
    offloaded = torch.searchsorted(sorted_conf, thresholds, side="left")  # how many are strictly below

    def prefix(values: torch.Tensor) -> torch.Tensor:
        """Totals of `values` over the first 0..N samples of the confidence order."""
        return torch.cat([values.new_zeros(1), values[order].cumsum(0)])

    gain = prefix(samples.offload_correct.double() - samples.edge_correct.double())
    edge_correct = samples.edge_correct.double().sum()
    return {
        "threshold": thresholds,
        "offload_ratio": offloaded.double() / n,
        "acc": (edge_correct + gain[offloaded]) / n,
        "latency_ms": samples.edge.latency_ms + prefix(samples.offload_latency_ms.double())[offloaded] / n,
        "energy_mj": samples.edge.edge_energy_mj + prefix(samples.offload_energy_mj.double())[offloaded] / n,
        "system_energy_mj": samples.edge.system_energy_mj
        + prefix(samples.offload_system_energy_mj.double())[offloaded] / n,
    }


def at_mask(samples: RoutedSamples, offloaded: torch.Tensor, offload_correct: torch.Tensor | None = None) -> dict:
    """The metrics when exactly the samples in `offloaded` go to the near-edge (answers from `offload_correct`)."""
    correct = samples.offload_correct if offload_correct is None else offload_correct
    n = len(samples)
    off = offloaded.double()
    return {
        "offload_ratio": float(off.mean()),
        "acc": float(torch.where(offloaded, correct, samples.edge_correct).double().mean()),
        "latency_ms": samples.edge.latency_ms + float((off * samples.offload_latency_ms).sum()) / n,
        "energy_mj": samples.edge.edge_energy_mj + float((off * samples.offload_energy_mj).sum()) / n,
        "system_energy_mj": samples.edge.system_energy_mj + float((off * samples.offload_system_energy_mj).sum()) / n,
    }


def choose_threshold(
    table: dict[str, torch.Tensor], budget: dict[str, float | None] | None = None, name: str = "budget"
) -> int:
    """Index of the most accurate threshold within the budget (ties: the one offloading least); `name` is the
    option the budget came from, for the error when no threshold meets it."""
    active = check_budget(budget, name)
    allowed = torch.ones_like(table["acc"], dtype=torch.bool)
    for key, limit in active.items():
        allowed &= table[key] <= limit + 1e-12
    if not allowed.any():
        limits = ", ".join(f"{key} <= {value}" for key, value in active.items())
        cheapest = {key: float(table[key].min()) for key in active}
        raise UserError(f"no threshold meets the {name} ({limits}); the cheapest point has {cheapest}")
    acc = torch.where(allowed, table["acc"], torch.full_like(table["acc"], -1.0))
    best = acc.max()
    candidates = torch.nonzero(acc >= best - 1e-12).flatten()
    return int(candidates[table["offload_ratio"][candidates].argmin()])


def row(table: dict[str, torch.Tensor], index: int) -> dict[str, float]:
    return {key: float(table[key][index]) for key in METRICS}


def rows(table: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    return [row(table, i) for i in range(len(table["threshold"]))]

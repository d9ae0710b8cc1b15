"""Accuracy, offload ratio, latency and energy for every routing threshold at once.

Which expert a sample would go to does not depend on the threshold, only *whether* it goes. So each sample
is reduced to: its confidence, whether the edge answer is right, whether the offloaded answer is right, and
what offloading it adds in latency and energy. Sorting the samples by confidence turns "offload every sample
below tau" into a prefix of that order, and cumulative sums give every threshold's totals in one
`searchsorted`: O(N log N + T) instead of O(N x T).

With a second expert (`sweep_two`) a sample also has a mass gap, and below a margin m an offloaded sample is
answered (and paid) as a pair. Its totals are the one-expert totals plus, for each m, the prefix sums of
[gap < m] x (pair value - single value) in the same confidence order: an (M, N) cumulative sum read at the same
T prefix lengths, so τ x margin costs O(M N + T M), still no loop over settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from askexpert.collab.budgets import check_budget
from askexpert.collab.costs import SampleCosts
from askexpert.errors import UserError

METRICS = ("threshold", "offload_ratio", "acc", "latency_ms", "energy_mj", "system_energy_mj")
PAIR_METRICS = (*METRICS, "margin", "second_ratio")


@dataclass
class PairedSamples:
    """Per sample, what asking the runner-up expert too would give: the mass gap (+inf: no runner-up), whether
    the two-expert answer is right, and what the pair adds instead of the one expert."""

    gap: torch.Tensor  # (N,)
    second: torch.Tensor  # (N,) the runner-up expert (NO_EXPERT: none)
    correct: torch.Tensor  # (N,) bool
    latency_ms: torch.Tensor  # (N,)
    energy_mj: torch.Tensor  # (N,)
    system_energy_mj: torch.Tensor  # (N,)


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
    pair: PairedSamples | None = None  # what asking a second expert would change (None: not evaluated)

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


def at_mask(
    samples: RoutedSamples,
    offloaded: torch.Tensor,
    offload_correct: torch.Tensor | None = None,
    paired: torch.Tensor | None = None,
) -> dict:
    """The metrics when exactly the samples in `offloaded` go to the near-edge (answers from `offload_correct`),
    those in `paired` (a subset) to two experts (`samples.pair`)."""
    correct = samples.offload_correct if offload_correct is None else offload_correct
    latency, energy = samples.offload_latency_ms, samples.offload_energy_mj
    system = samples.offload_system_energy_mj
    if paired is not None:
        pair, paired = samples.pair, paired & offloaded
        correct = torch.where(paired, pair.correct, correct)
        latency = torch.where(paired, pair.latency_ms, latency)
        energy = torch.where(paired, pair.energy_mj, energy)
        system = torch.where(paired, pair.system_energy_mj, system)
    n = len(samples)
    off = offloaded.double()
    point = {
        "offload_ratio": float(off.mean()),
        "acc": float(torch.where(offloaded, correct, samples.edge_correct).double().mean()),
        "latency_ms": samples.edge.latency_ms + float((off * latency).sum()) / n,
        "energy_mj": samples.edge.edge_energy_mj + float((off * energy).sum()) / n,
        "system_energy_mj": samples.edge.system_energy_mj + float((off * system).sum()) / n,
    }
    if paired is not None:
        point["second_ratio"] = float(paired.double().mean())
    return point


def default_margins(steps: int = 21) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def sweep_two(
    samples: RoutedSamples, thresholds: torch.Tensor | None = None, margins: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Every metric of `PAIR_METRICS` for every (threshold, margin), flattened threshold-major (T x M rows): a
    sample is offloaded iff confidence < threshold, and asked of two experts iff also gap < margin."""
    if samples.pair is None:
        raise UserError("the second-expert sweep needs the samples' runner-up answers (RoutedSamples.pair)")
    margins = default_margins() if margins is None else margins.to(torch.float64)
    one = sweep(samples, thresholds)
    pair = samples.pair
    confidence = samples.confidence.to(torch.float64)
    order = confidence.argsort()
    offloaded = torch.searchsorted(confidence[order], one["threshold"], side="left")  # prefix lengths, as in `sweep`
    asked = pair.gap.to(torch.float64)[order][None, :] < margins[:, None]  # (M, N) in confidence order
    n, m = len(samples), len(margins)
    # what pairing adds to each total, per sample: every metric at once, so one (5, M, N) cumulative sum
    keys = ("acc", "latency_ms", "energy_mj", "system_energy_mj", "second_ratio")
    delta = torch.stack(
        [
            pair.correct.double() - samples.offload_correct.double(),
            pair.latency_ms.double() - samples.offload_latency_ms.double(),
            pair.energy_mj.double() - samples.offload_energy_mj.double(),
            pair.system_energy_mj.double() - samples.offload_system_energy_mj.double(),
            torch.ones(n, dtype=torch.float64),
        ]
    )[:, order]
    totals = (delta[:, None, :] * asked).cumsum(2)  # (5, M, N): totals over the first 1..N samples
    totals = torch.cat([totals.new_zeros(len(keys), m, 1), totals], dim=2)[:, :, offloaded]  # (5, M, T)
    table = {key: value[:, None].expand(-1, m) for key, value in one.items()}
    table["second_ratio"] = torch.zeros_like(table["acc"])
    for index, key in enumerate(keys):
        table[key] = table[key] + totals[index].T / n
    table["margin"] = margins[None, :].expand(len(one["threshold"]), -1)
    return {key: value.reshape(-1).contiguous() for key, value in table.items()}


def choose_threshold(
    table: dict[str, torch.Tensor], budget: dict[str, float | None] | None = None, name: str = "budget"
) -> int:
    """Index of the most accurate threshold within the budget (ties: the one offloading least, then the one
    asking fewest second experts); `name` is the option the budget came from, for the error when none meets it."""
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
    offload = table["offload_ratio"][candidates]
    candidates = candidates[offload <= offload.min() + 1e-12]
    if "second_ratio" in table:
        candidates = candidates[table["second_ratio"][candidates].argmin()][None]
    return int(candidates[0])


def row(table: dict[str, torch.Tensor], index: int) -> dict[str, float]:
    return {key: float(table[key][index]) for key in (PAIR_METRICS if "margin" in table else METRICS)}


def rows(table: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    return [row(table, i) for i in range(len(table["threshold"]))]

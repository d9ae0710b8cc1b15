"""The second expert, evaluated: what asking the runner-up expert too gives, and its operating point.

The rule itself (who the runner-up is, the mass gap, the fusion) lives in `collab/routing.py` with the rest of the
router; this module turns a split's cached logits into `PairedSamples` for the sweep and chooses τ and the margin
together on the calibration split, under the same budgets as the one-expert system, so that the two systems are
compared at equal limits (docs/collaborative.md, *A second expert*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from askexpert.collab.costs import CostModel, ModelCost
from askexpert.collab.routing import NO_EXPERT, EdgeDecision, check_margin, check_second_fusion, fuse_two
from askexpert.collab.sweep import PairedSamples, RoutedSamples, at_mask, choose_threshold, default_margins, sweep_two
from askexpert.errors import UserError


@dataclass
class SecondExpert:
    """Ask a second expert when the router is torn (`--routing.second_expert.*`).

    Args:
        enabled: evaluate the two-expert system (its own report row, next to the one-expert system); off by default.
        margin: ask the runner-up expert too iff the mass gap between the two best experts (a share of the top-k
            mass, in [0, 1]) is below it; None chooses it on the calibration split together with τ, under the same
            budgets; 0 never asks.
        fusion: how the two experts' answers are combined: mass (each weighted by the top-k mass it owns),
            expert (equal weights), product or mean (with the generalist too).
    """

    enabled: bool = False
    margin: float | None = None
    fusion: str = "mass"

    def check(self) -> None:
        check_margin(self.margin)
        check_second_fusion(self.fusion)


def pair_costs(cost_model: CostModel, models: list[ModelCost] | None) -> torch.Tensor:
    """(E, E, 3) latency, edge energy and system energy that asking experts a and b adds (`CostModel.offload_pair`)."""
    if models is None:
        raise UserError("the second expert needs each expert's model cost (ExpertSet.models)")
    table = torch.zeros(len(models), len(models), 3, dtype=torch.float64)
    for a, first in enumerate(models):
        for b, second in enumerate(models):
            cost = cost_model.offload_pair(first, second)
            table[a, b] = torch.tensor([cost.latency_ms, cost.edge_energy_mj, cost.system_energy_mj])
    return table


def paired_samples(
    decision: EdgeDecision,
    expert_logits: list[torch.Tensor],
    labels: torch.Tensor,
    costs: torch.Tensor,
    fusion: str,
) -> PairedSamples:
    """What asking the runner-up too gives each sample of a split: `expert_logits` are the split's logits of every
    expert, `costs` the `pair_costs` table."""
    first, second = decision.expert.clamp_min(0), decision.second.clamp_min(0)
    stacked = torch.stack(expert_logits)  # (E, N, width)
    rows = torch.arange(len(labels))
    answer = fuse_two(decision.probs, stacked[first, rows], stacked[second, rows], decision.mass, fusion)
    has_pair = (decision.expert != NO_EXPERT) & (decision.second != NO_EXPERT)
    cost = costs[first, second]  # (N, 3)
    return PairedSamples(
        gap=decision.gap.double(),
        second=decision.second,
        correct=(answer == labels) & has_pair,
        latency_ms=cost[:, 0],
        energy_mj=cost[:, 1],
        system_energy_mj=cost[:, 2],
    )


def pair_mask(samples: RoutedSamples, threshold: float, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(offloaded, asked of two experts) at (`threshold`, `margin`), the rule of `EdgeDecision.second_routes`."""
    offloaded = samples.confidence < threshold
    return offloaded, offloaded & (samples.pair.gap < margin)


def choose_point(
    calib: RoutedSamples,
    setting: SecondExpert,
    thresholds: torch.Tensor,
    threshold: float | None,
    budget: dict[str, float],
    name: str,
) -> tuple[float, float]:
    """(threshold, margin) of the most accurate two-expert point within `budget` on the calibration samples: both
    chosen unless given (`threshold`, `setting.margin`)."""
    margins = default_margins() if setting.margin is None else torch.tensor([setting.margin], dtype=torch.float64)
    grid = thresholds if threshold is None else torch.tensor([threshold], dtype=torch.float64)
    table = sweep_two(calib, grid, margins)
    index = choose_threshold(table, budget, name)
    return float(table["threshold"][index]), float(table["margin"][index])


def operating_point(
    test: RoutedSamples, threshold: float, margin: float, fusion: str, chosen_on: str, owns_class
) -> dict:
    """The two-expert system at (`threshold`, `margin`) on test; `owns_class(offloaded, paired)` is the routing
    accuracy (an expert that owns the true class among those asked)."""
    offloaded, paired = pair_mask(test, threshold, margin)
    point = {"threshold": threshold, "margin": margin, "fusion": fusion, "chosen_on": chosen_on}
    point.update(at_mask(test, offloaded, paired=paired))
    point["routing_acc"] = owns_class(offloaded, paired)
    return point


def add_points(report: dict, config, test: RoutedSamples, calib, grid, split: str, owns_class) -> None:
    """report["second_expert"] (under `config.budget`) and report["constrained"]["second_expert"] (under
    `config.constrained`, when set): τ and margin chosen together on the `calib` samples over the threshold `grid`,
    unless both are given; `owns_class(offloaded, paired)` is the routing accuracy."""
    setting = config.second_expert

    def point(limits: dict, name: str, threshold: float | None) -> dict:
        if threshold is not None and setting.margin is not None:  # both given: nothing to choose
            tau, margin, chosen_on = float(threshold), float(setting.margin), "given"
        else:
            tau, margin = choose_point(calib, setting, grid, threshold, limits, name)
            chosen_on = split
        return operating_point(test, tau, margin, setting.fusion, chosen_on, owns_class)

    report["second_expert"] = point(config.budget_dict(), "routing.budget", config.threshold)
    if config.constrained_dict():
        report["constrained"]["second_expert"] = point(config.constrained_dict(), "routing.constrained", None)


def calibration_scores(report: dict, calib: RoutedSamples, split: str) -> dict:
    """The two-expert points chosen on `split`, scored there (accuracy, offload, share asked of two): what tuning
    may compare, as for the one-expert points."""
    pairs = {
        "second_expert": report.get("second_expert"),
        "constrained_second_expert": (report.get("constrained") or {}).get("second_expert"),
    }
    scores = {}
    for name, pair in pairs.items():
        if pair and pair["chosen_on"] == split:
            offloaded, paired = pair_mask(calib, pair["threshold"], pair["margin"])
            found = at_mask(calib, offloaded, paired=paired)
            scores[name] = {key: found[key] for key in ("acc", "offload_ratio", "second_ratio")}
    return scores

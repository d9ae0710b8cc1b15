"""The research paper's claims, measured per ablation setting: one table, the paper's figure beside ours.

"Ask the Expert" (Liu & Fahmy, 2026) reports four figures. Each is measured here inside one run (one cell and
seed), so every difference is paired: the same generalist, base model, partition, router and test images on
both sides. Per seed, per-expert figures are first averaged over the run's experts; the table shows the mean
± sample standard deviation over seeds.

A setting gets a column when its runs carry the comparisons the claims need: static experts trained beside
its own (`static_baseline: true`), so `specialization: static` cells and grids without that baseline have
none. The budget rows need the second operating point (`routing.constrained`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from askexpert.ablation.results import mean_std, number

PAPER = {"subsets": 4.12, "overall": 2.76, "latency": -45.0, "energy": -46.0}


def _points(a: str, b: str) -> Callable[[dict], float | None]:
    def value(row: dict) -> float | None:
        x, y = number(row.get(a)), number(row.get(b))
        return None if x is None or y is None else 100 * (x - y)

    return value


def _relative(a: str, b: str) -> Callable[[dict], float | None]:
    def value(row: dict) -> float | None:
        x, y = number(row.get(a)), number(row.get(b))
        return None if x is None or not y else 100 * (x / y - 1)

    return value


def _percent(a: str) -> Callable[[dict], float | None]:
    def value(row: dict) -> float | None:
        x = number(row.get(a))
        return None if x is None else 100 * x

    return value


def _break_even(limit: Callable[[dict], float | None], key: str) -> Callable[[dict], float | None]:
    """The offload ratio (%) at which `key` (latency_ms or energy_mj) reaches `limit(row)`, from the cost
    model's arithmetic: edge-only cost + offload ratio x the cost of one offloaded image (every expert of a run
    has the same architecture, so one offload costs the same whichever expert takes it)."""

    def value(row: dict) -> float | None:
        edge, total = number(row.get(f"edge_only_{key}")), number(row.get(key))
        offload, target = number(row.get("offload_ratio")), limit(row)
        if None in (edge, total, offload, target) or not offload or total <= edge:
            return None
        per_offload = (total - edge) / offload
        return 100 * min(1.0, max(0.0, (target - edge) / per_offload))

    return value


def _scaled(key: str, factor: float) -> Callable[[dict], float | None]:
    def value(row: dict) -> float | None:
        x = number(row.get(key))
        return None if x is None else factor * x

    return value


@dataclass(frozen=True)
class Claim:
    label: str
    definition: str
    unit: str  # "points" or "%"
    value: Callable[[dict], float | None]  # from one results.csv row
    paper: float | None = None  # the paper's figure, for the four claims


CLAIMS = (
    Claim(
        "experts vs static experts, own classes",
        "an expert's test accuracy on its own classes minus the static expert's on the same classes (same "
        "base init, same optimizer steps, only the data mix and schedule differ)",
        "points",
        _points("subset_test_acc", "static_subset_test_acc"),
        PAPER["subsets"],
    ),
    Claim(
        "system vs static-expert system",
        "system accuracy minus the accuracy of the same system (same router, threshold and offloaded images) "
        "answered by the static experts",
        "points",
        _points("system_acc", "static_system_acc"),
        PAPER["overall"],
    ),
    Claim(
        "latency vs edge execution",
        "the system's mean latency per image relative to running the base model on the edge device",
        "%",
        _relative("latency_ms", "edge_medium_latency_ms"),
        PAPER["latency"],
    ),
    Claim(
        "edge energy vs full offload",
        "the edge device's mean energy per image relative to sending every image to the base model on the near-edge",
        "%",
        _relative("energy_mj", "full_offload_energy_mj"),
        PAPER["energy"],
    ),
    Claim(
        "experts vs the generalist, own classes",
        "an expert's accuracy on its own classes minus the generalist's on the same images",
        "points",
        _points("subset_test_acc", "generalist_subset_test_acc"),
    ),
    Claim(
        "experts on the other experts' classes",
        "an expert's accuracy on the test images of classes it does not own: what a misrouted image gets",
        "%",
        _percent("other_test_acc"),
    ),
    Claim(
        "static experts on the other experts' classes",
        "the same for the static expert of the same classes",
        "%",
        _percent("static_other_test_acc"),
    ),
    Claim("system accuracy", "test accuracy at the operating point chosen on validation", "%", _percent("system_acc")),
    Claim("offloaded", "share of test images sent to the near-edge", "%", _percent("offload_ratio")),
    Claim(
        "routing accuracy",
        "share of the offloaded images sent to an expert that owns their class",
        "%",
        _percent("routing_acc"),
    ),
    Claim(
        "oracle expert vs system",
        "accuracy with every offloaded image sent to its true class's expert, minus the system's",
        "points",
        _points("oracle_acc", "system_acc"),
    ),
    Claim(
        "latency: break-even offload",
        "the largest share of images the system may offload and still be as fast as edge execution, from the "
        "cost model (edge-only latency + share x the latency of one offloaded image)",
        "%",
        _break_even(_scaled("edge_medium_latency_ms", 1.0), "latency_ms"),
    ),
    Claim(
        "energy: offload for the paper's -46 %",
        "the largest share of images the system may offload and still use 46 % less edge energy than full "
        "offload, from the cost model",
        "%",
        _break_even(_scaled("full_offload_energy_mj", 1 + PAPER["energy"] / 100), "energy_mj"),
    ),
    Claim("base model", "the all-class base model's test accuracy (full offload)", "%", _percent("base_acc")),
    Claim("generalist", "the generalist alone (edge only)", "%", _percent("edge_only_acc")),
    Claim(
        "under budget: system accuracy",
        "test accuracy at the second operating point, chosen on validation under `routing.constrained`",
        "%",
        _percent("constrained_system_acc"),
    ),
    Claim("under budget: offloaded", "its share of offloaded test images", "%", _percent("constrained_offload_ratio")),
    Claim(
        "under budget: vs static-expert system",
        "its accuracy minus the static experts' at the same threshold",
        "points",
        _points("constrained_system_acc", "constrained_static_acc"),
    ),
    Claim(
        "under budget: latency vs edge execution",
        "its mean latency relative to the base model on the edge",
        "%",
        _relative("constrained_latency_ms", "edge_medium_latency_ms"),
    ),
    Claim(
        "under budget: edge energy vs full offload",
        "its edge energy relative to full offload",
        "%",
        _relative("constrained_energy_mj", "full_offload_energy_mj"),
    ),
)


def per_seed(rows: list[dict], claim: Claim) -> dict[str, float]:
    """The claim's value per seed (a seed's per-expert values averaged over its experts)."""
    found: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        value = claim.value(row)
        if value is not None:
            found[str(row["seed"])].append(value)
    return {seed: statistics.fmean(values) for seed, values in found.items()}


def verdict(mean: float, std: float | None, paper: float) -> str:
    """Whether our figure goes the paper's way beyond one standard deviation of the seeds (one seed has no
    spread to judge by)."""
    if std is None:
        return "one seed: no spread"
    if abs(mean) <= std:
        return "unclear (within 1 std)"
    return "yes" if mean * paper > 0 else "no, the opposite"


def settings_with_claims(rows: list[dict], columns: list[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by grid setting, for the settings whose runs carry a static-expert comparison."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[c] for c in columns)].append(row)
    # static experts *beside* the run's own (a `specialization: static` run's baseline would be itself)
    return {k: v for k, v in grouped.items() if any(number(r.get("static_subset_test_acc")) is not None for r in v)}


# The rows of the short table (the README's headline): the paper's four figures, then what explains them.
HEADLINE = (
    "experts vs static experts, own classes",
    "system vs static-expert system",
    "latency vs edge execution",
    "edge energy vs full offload",
    "system accuracy",
    "offloaded",
    "routing accuracy",
    "under budget: system accuracy",
    "under budget: vs static-expert system",
    "under budget: latency vs edge execution",
    "under budget: edge energy vs full offload",
)


def markdown(rows: list[dict], columns: list[str], only: tuple[str, ...] | None = None) -> str | None:
    """The claims table (rows: claims, or those labelled in `only`; columns: the paper, then each setting) with
    its legend and definitions, or None when no setting has the comparisons."""
    settings = settings_with_claims(rows, columns)
    if not settings:
        return None
    names = [", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True)) or "default" for key in settings]
    lines = [
        "| claim | unit | paper | " + " | ".join(names) + " |",
        "|---|---|---:|" + "---:|" * len(names),
    ]
    notes = []
    for claim in CLAIMS:
        if only is not None and claim.label not in only:
            continue
        cells = []
        for setting_rows in settings.values():
            values = per_seed(setting_rows, claim)
            if not values:
                cells.append("–")
                continue
            mean, std = mean_std(list(values.values()))
            text = (f"{mean:+.2f}" if claim.unit == "points" or claim.paper is not None else f"{mean:.2f}") + (
                "" if std is None else f" ± {std:.2f}"
            )
            if claim.paper is not None:
                text += f" ({verdict(mean, std, claim.paper)})"
            cells.append(text + f" [{len(values)}]")
        if all(cell == "–" for cell in cells):
            continue
        paper = "–" if claim.paper is None else f"{claim.paper:+.2f}"
        lines.append(f"| {claim.label} | {claim.unit} | {paper} | " + " | ".join(cells) + " |")
        notes.append(f"- *{claim.label}*: {claim.definition}.")
    budgets = sorted({r.get("constrained_budget") for rs in settings.values() for r in rs} - {"", None})
    legend = (
        "Mean ± sample std over seeds, [number of seeds]; per seed, per-expert figures are averaged over the run's "
        "experts. For the paper's four figures, (yes) means the same direction as the paper beyond one standard "
        "deviation of the seeds." + (f" Budget of the *under budget* rows: {'; '.join(budgets)}." if budgets else "")
    )
    return "\n".join([*lines, "", legend, "", *notes])

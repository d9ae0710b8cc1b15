"""What the report's plots need beyond the headline numbers, computed from the cached logits (`collab/plots.py`
draws them):

- `reliability`: the generalist's top-1 probability against its accuracy, in equal-width bins, before and after
  temperature scaling, with the expected calibration error (ECE) of each;
- `routing_counts`: for the test images offloaded at the selected operating point, how many of each class
  reach each expert.
"""

from __future__ import annotations

import torch

from askexpert.collab.routing import NO_EXPERT, decide

RELIABILITY_BINS = 15  # Guo et al. (2017)


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, temperature: float, bins: int) -> dict:
    """The ECE of softmax(logits / temperature) and its bins.

    ECE = sum over bins b of (n_b / N) * |accuracy_b - mean confidence_b|, where confidence is the top-1
    probability, bins are `bins` equal-width intervals of [0, 1] (the first closed) and accuracy_b is the share
    of the bin's images whose top-1 class is right. Each bin: its bounds, count, mean confidence and accuracy
    (None when empty)."""
    probs = (logits.double() / temperature).softmax(-1)
    conf, answer = probs.max(-1)
    correct = (answer == labels).double()
    index = (conf * bins).ceil().long().clamp(1, bins) - 1  # (lo, hi]; 0 falls in the first bin
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    right_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    filled = count > 0
    mean_conf = torch.where(filled, conf_sum / count.clamp_min(1), torch.zeros_like(count))
    accuracy = torch.where(filled, right_sum / count.clamp_min(1), torch.zeros_like(count))
    ece = float((count / max(len(labels), 1) * (accuracy - mean_conf).abs()).sum())
    rows = [
        {
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "count": int(count[b]),
            "confidence": float(mean_conf[b]) if filled[b] else None,
            "accuracy": float(accuracy[b]) if filled[b] else None,
        }
        for b in range(bins)
    ]
    return {"ece": ece, "bins": rows}


def reliability(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    split: str,
    fitted_on: str | None,
    bins: int = RELIABILITY_BINS,
) -> dict:
    """The report's `reliability` entry: the generalist on `split` at temperature 1 and at `temperature`
    (fitted on `fitted_on`; None: temperature scaling was off, the two agree)."""
    before = reliability_bins(logits, labels, 1.0, bins)
    after = reliability_bins(logits, labels, temperature, bins)
    return {
        "split": split,
        "images": len(labels),
        "temperature": temperature,
        "fitted_on": fitted_on,
        "num_bins": bins,
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "bins": {"before": before["bins"], "after": after["bins"]},
    }


def routing_counts(routes: torch.Tensor, labels: torch.Tensor, num_classes: int, num_experts: int) -> list[list[int]]:
    """(classes x experts) counts: how many images of class c were routed to expert e (`routes` as
    `EdgeDecision.routes` gives them; NO_EXPERT: kept on the edge, not counted)."""
    sent = routes != NO_EXPERT
    flat = labels[sent].long() * num_experts + routes[sent].long()
    counts = torch.bincount(flat, minlength=num_classes * num_experts).reshape(num_classes, num_experts)
    return counts.tolist()


def routing_entry(system, routing: dict, threshold: float) -> dict:
    """The report's `routing_counts` entry: per test class and expert, the images offloaded to that expert at
    the selected `threshold` (the first expert asked; a second one, when enabled, is not counted)."""
    decision = decide(
        system.generalist["test"], system.coverage, routing["temperature_value"], routing["gate"], routing["top_k"]
    )
    routes = decision.routes(threshold)
    num_experts = system.coverage.shape[0]
    counts = routing_counts(routes, system.labels["test"], system.num_classes, num_experts)
    return {"threshold": threshold, "offloaded": int((routes != NO_EXPERT).sum()), "counts": counts}


def diagnostics(system, routing: dict, threshold: float) -> dict:
    """The report entries the plots read: `reliability` (on test) and `routing_counts`."""
    fitted_on = system.calibration_split if routing["temperature"] else None
    test = reliability(
        system.generalist["test"], system.labels["test"], routing["temperature_value"], "test", fitted_on
    )
    return {"reliability": test, "routing_counts": routing_entry(system, routing, threshold)}

"""The router: when the generalist's answer is not trusted, and which expert gets the sample.

Every gate maps the generalist's class probabilities to a confidence in [0, 1] (1 = sure):
- `max_prob`: the top-1 probability;
- `margin`: top-1 minus top-2 probability;
- `entropy`: 1 - H(p) / ln C (1 for a one-hot answer, 0 for the uniform one).
A sample is offloaded iff its confidence < threshold, so threshold 0 offloads nothing and threshold 1
offloads every sample that is not perfectly sure. Probabilities may first be temperature-scaled
(`fit_temperature`, on validation logits), which changes the gate and the top-k mass but never the ranks.

Expert selection (`select_experts`): among the generalist's top-k classes, the expert whose classes hold the
most probability mass. Ties (exact equality, common with k = 1 or with overlapping experts that share a
class) go to an expert that owns the top-1 class; if several do, to the one with more probability mass over
all of its classes; then to the lowest index. A sample none of whose top-k classes belongs to any expert
(only possible with `allow_uncovered` partitions) has no expert (-1) and stays on the edge.

Fusion (`fuse`) of the final answer of an offloaded sample:
- `expert` (default): the expert's answer; a dustbin expert's "other" answer hands the sample back to the
  generalist's answer;
- `product`: normalised product of the edge and expert probabilities (both must agree to be confident);
- `mean`: average of the two probability vectors.

A second expert (`second_expert`, optional): when the top-k mass of an offloaded sample is split between two
experts, both are asked. The split is measured by the *mass gap*: (mass of the chosen expert - mass of the
runner-up) / the top-k mass, in [0, 1] (0: a dead heat; 1: the runner-up holds nothing). Both are asked iff the
sample is offloaded, a runner-up exists and gap < margin, so margin 0 never asks a second expert and margin 1 asks
one whenever a runner-up holds some mass: the margin is swept like the threshold. The runner-up is the expert of
highest mass after the chosen one (lowest index on ties). Their answers are fused (`fuse_two`) by `mass` (each
expert's class probabilities weighted by the top-k mass it owns), `expert` (equal weights), `product` or `mean`
(with the generalist, as for one expert); an expert that answers "other" (dustbin) drops out of the fusion, and
when both do the generalist answers.

`decide` is the one place the generalist's logits become this decision (temperature, gate, expert), and
`EdgeDecision.routes` the one place a threshold turns it into "offloaded to expert e": the evaluation, `route`,
`export` (PyTorch, ONNX and int8 alike) and the `edge` client all call them, so they decide alike to the bit.
Everything here works on torch tensors: the edge client turns ONNX Runtime's NumPy output into one (it ships
with torch anyway, for these functions), rather than keep a NumPy copy of the router that could drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from askexpert.errors import UserError
from askexpert.files.fields import BadField, whole

GATES = ("max_prob", "margin", "entropy")
FUSIONS = ("expert", "product", "mean")
SECOND_FUSIONS = ("mass", "expert", "product", "mean")
NO_EXPERT = -1


def check_gate(gate: str) -> None:
    if gate not in GATES:
        raise UserError(f"unknown gate {gate!r}; gates: {', '.join(GATES)}")


def check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise UserError(f"unknown fusion {fusion!r}; fusions: {', '.join(FUSIONS)}")


def check_second_fusion(fusion: str) -> None:
    if fusion not in SECOND_FUSIONS:
        raise UserError(f"unknown second-expert fusion {fusion!r}; fusions: {', '.join(SECOND_FUSIONS)}")


def check_margin(margin: float | None) -> None:
    if margin is not None and not 0.0 <= margin <= 1.0:
        raise UserError(f"the second expert's margin must be in [0, 1], got {margin}")


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"the routing threshold must be in [0, 1], got {threshold}")


def check_seed(seed, label: str = "routing.seed") -> int:
    """The random_expert baseline's seed, by the one rule `--routing.seed` and a report.json read back follow: a
    whole number torch's generator takes (0 to 2**64 - 1). Raises BadField naming it as `label`."""
    if whole(seed, label, 0) >= 2**64:
        raise BadField(f"{label} must be below 2**64 (torch's generator takes no larger seed), got {seed}")
    return seed


def check_top_k(top_k: int, num_classes: int) -> None:
    if not 1 <= top_k <= num_classes:
        raise UserError(f"top_k must be between 1 and the number of classes ({num_classes}), got {top_k}")


def confidence(probs: torch.Tensor, gate: str) -> torch.Tensor:
    """(N,) confidence in [0, 1] of probability rows (N, C) under `gate`."""
    check_gate(gate)
    if gate == "max_prob":
        value = probs.max(-1).values
    elif gate == "margin":
        top2 = probs.topk(2, dim=-1).values
        value = top2[:, 0] - top2[:, 1]
    else:
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        value = 1.0 - entropy / math.log(probs.shape[-1])
    return value.clamp(0.0, 1.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 50) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al., 2017)."""
    if len(labels) == 0:
        raise UserError("temperature scaling needs validation data: set --data.val_fraction above 0")
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # optimise log T: T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expert_masses(probs: torch.Tensor, coverage: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, E) probability mass of the top-k classes each expert owns, (N,) the top-k mass), for (N, C) `probs`
    and the partition's (E, C) bool `coverage`."""
    num_classes = probs.shape[-1]
    check_top_k(top_k, num_classes)
    if coverage.shape[-1] != num_classes:
        raise UserError(f"the partition covers {coverage.shape[-1]} classes but the generalist answers {num_classes}")
    owners = coverage.T.to(probs.dtype)  # (C, E)
    top_p, top_i = probs.topk(top_k, dim=-1)  # (N, k)
    return (top_p.unsqueeze(-1) * owners[top_i]).sum(1), top_p.sum(-1)


def select_experts(probs: torch.Tensor, coverage: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N,) index of the expert each sample would go to (NO_EXPERT if no expert covers its top-k classes).

    `probs` is (N, C); `coverage` is the partition's (E, C) bool table.
    """
    mass, _ = expert_masses(probs, coverage, top_k)
    return _chosen(probs, coverage, top_k, mass)


def _chosen(probs: torch.Tensor, coverage: torch.Tensor, top_k: int, mass: torch.Tensor) -> torch.Tensor:
    """The expert of most top-k `mass`, ties broken as the module says."""
    owners = coverage.T.to(probs.dtype)  # (C, E)
    top1 = probs.topk(top_k, dim=-1).indices[:, 0]  # as expert_masses ranks them (ties: the same order)
    best = mass.max(-1, keepdim=True).values
    tied = mass >= best * (1 - 1e-6)
    owns_top1 = owners[top1] > 0
    total = probs @ owners  # (N, E): mass over all of each expert's classes, the second tie-break
    # lexicographic key: tied at the best mass, then owns top-1, then total mass (in [0, 1]); argmax takes the
    # first (lowest index) of equal keys
    key = tied.to(probs.dtype) * 4 + owns_top1.to(probs.dtype) * 2 + total
    chosen = key.argmax(-1)
    return torch.where(best.squeeze(-1) > 0, chosen, torch.full_like(chosen, NO_EXPERT))


def runner_up(mass: torch.Tensor, topk_mass: torch.Tensor, chosen: torch.Tensor):
    """((N,) the expert of most top-k mass after `chosen` (NO_EXPERT: none holds any), (N,) the mass gap between
    the two as a share of the top-k mass (+inf without a runner-up), (N, 2) their masses)."""
    others = mass.scatter(1, chosen.clamp_min(0)[:, None], -1.0)  # the chosen expert can't be its own runner-up
    second_mass, second = others.max(-1)
    has_second = (second_mass > 0) & (chosen != NO_EXPERT)
    second = torch.where(has_second, second, torch.full_like(second, NO_EXPERT))
    first_mass = mass.gather(1, chosen.clamp_min(0)[:, None]).squeeze(1)
    second_mass = second_mass.clamp_min(0)
    gap = (first_mass - second_mass) / topk_mass.clamp_min(1e-12)
    gap = torch.where(has_second, gap.clamp(0.0, 1.0), torch.full_like(gap, float("inf")))
    return second, gap, torch.stack([first_mass, second_mass], dim=1)


def class_probs(expert_logits: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities over the C classes, whether the expert answered "other") for (N, C) or (N, C+1) logits."""
    probs = expert_logits.float().softmax(-1)
    if probs.shape[-1] == num_classes:
        return probs, torch.zeros(len(probs), dtype=torch.bool)
    said_other = probs.argmax(-1) == num_classes
    inside = probs[:, :num_classes]
    return inside / inside.sum(-1, keepdim=True).clamp_min(1e-12), said_other


def fuse(edge_probs: torch.Tensor, expert_logits: torch.Tensor, fusion: str = "expert") -> torch.Tensor:
    """(N,) final answer for samples answered by an expert, combining edge and expert as `fusion` says."""
    check_fusion(fusion)
    expert_probs, said_other = class_probs(expert_logits, edge_probs.shape[-1])
    if fusion == "expert":
        answer = expert_probs.argmax(-1)
    elif fusion == "product":
        answer = (edge_probs.clamp_min(1e-12).log() + expert_probs.clamp_min(1e-12).log()).argmax(-1)
    else:
        answer = (edge_probs + expert_probs).argmax(-1)
    return torch.where(said_other, edge_probs.argmax(-1), answer)


def fuse_two(
    edge_probs: torch.Tensor,
    first_logits: torch.Tensor,
    second_logits: torch.Tensor,
    mass: torch.Tensor,
    fusion: str = "mass",
) -> torch.Tensor:
    """(N,) final answer for samples answered by two experts (`second_expert` in the module's text): `mass` is
    (N, 2), the top-k mass each owns (the `mass` fusion's weights)."""
    check_second_fusion(fusion)
    num_classes = edge_probs.shape[-1]
    (p1, other1), (p2, other2) = class_probs(first_logits, num_classes), class_probs(second_logits, num_classes)
    p1, p2 = p1.to(edge_probs.dtype), p2.to(edge_probs.dtype)
    keep1, keep2 = (~other1).to(edge_probs.dtype)[:, None], (~other2).to(edge_probs.dtype)[:, None]
    if fusion in ("mass", "expert"):
        weights = mass.to(edge_probs.dtype) if fusion == "mass" else torch.ones_like(mass, dtype=edge_probs.dtype)
        score = keep1 * weights[:, :1] * p1 + keep2 * weights[:, 1:] * p2
    elif fusion == "product":
        log = torch.log
        score = log(edge_probs.clamp_min(1e-12)) + keep1 * log(p1.clamp_min(1e-12)) + keep2 * log(p2.clamp_min(1e-12))
    else:
        score = edge_probs + keep1 * p1 + keep2 * p2
    return torch.where(other1 & other2, edge_probs.argmax(-1), score.argmax(-1))


@dataclass(frozen=True)
class EdgeDecision:
    """What the edge decides from the generalist's logits, before any threshold or expert answer."""

    probs: torch.Tensor  # (N, C) float64: the temperature-scaled generalist probabilities
    confidence: torch.Tensor  # (N,) the gate's value
    expert: torch.Tensor  # (N,) the expert the router picks from the top-k (NO_EXPERT: none covers them)
    second: torch.Tensor  # (N,) the runner-up expert (NO_EXPERT: none holds top-k mass)
    gap: torch.Tensor  # (N,) mass gap between the two, as a share of the top-k mass (+inf: no runner-up)
    mass: torch.Tensor  # (N, 2) top-k mass of the chosen expert and of the runner-up

    def routes(self, threshold: float) -> torch.Tensor:
        """(N,) the expert each sample is offloaded to at `threshold`, NO_EXPERT where it stays on the edge: a
        sample is offloaded iff it is unsure (confidence < threshold) and some expert covers its top-k classes."""
        offloaded = (self.confidence < threshold) & (self.expert != NO_EXPERT)
        return torch.where(offloaded, self.expert, torch.full_like(self.expert, NO_EXPERT))

    def second_routes(self, threshold: float, margin: float | None) -> torch.Tensor:
        """(N,) the second expert each sample is also sent to (NO_EXPERT: none): offloaded at `threshold`, with a
        runner-up, and a mass gap below `margin` (None or 0: never)."""
        if not margin:
            return torch.full_like(self.expert, NO_EXPERT)
        asked = (self.routes(threshold) != NO_EXPERT) & (self.gap < margin)
        return torch.where(asked, self.second, torch.full_like(self.second, NO_EXPERT))


def decide(generalist_logits: torch.Tensor, coverage: torch.Tensor, temperature: float, gate: str, top_k: int):
    """The `EdgeDecision` for (N, C) generalist logits: softmax at `temperature` (in float64), the `gate`'s
    confidence, and the expert chosen among the top-`top_k` classes of the partition's (E, C) `coverage` (with
    its runner-up, for a second expert)."""
    probs = (generalist_logits.double() / temperature).softmax(-1)
    mass, topk_mass = expert_masses(probs, coverage, top_k)
    chosen = _chosen(probs, coverage, top_k, mass)
    second, gap, pair_mass = runner_up(mass, topk_mass, chosen)
    return EdgeDecision(probs, confidence(probs, gate), chosen, second, gap, pair_mass)


def fused_answers(
    probs: torch.Tensor,
    routes: torch.Tensor,
    expert_logits: Callable[[int, torch.Tensor], torch.Tensor],
    fusion: str,
    second: tuple[torch.Tensor, torch.Tensor, str] | None = None,
) -> torch.Tensor:
    """(N,) the system's answers: the generalist's top-1, or for the samples routed to expert e (`routes`, as
    `EdgeDecision.routes` gives them) the fusion with `expert_logits(e, rows)`, that expert's logits of those
    rows. `second`, when given, is (second routes as `EdgeDecision.second_routes` gives them, the decision's
    (N, 2) mass, the second-expert fusion): those samples fuse both experts' answers (`fuse_two`). Each expert is
    asked once, for all its rows, in index order (a caller may load each model only for its turn)."""
    answer = probs.argmax(-1)
    second_routes = torch.full_like(routes, NO_EXPERT) if second is None else second[0]
    both = second_routes != NO_EXPERT
    first_logits = second_logits = None  # (N, width) once the first expert has answered
    for e in torch.cat([routes[routes != NO_EXPERT], second_routes[both]]).unique().tolist():
        as_first, as_second = torch.nonzero(routes == e).flatten(), torch.nonzero(second_routes == e).flatten()
        rows = torch.cat([as_first, as_second]).unique()  # sorted: searchsorted finds each row's answer
        logits = expert_logits(e, rows)
        if first_logits is None:
            first_logits = logits.new_zeros(len(routes), logits.shape[-1])
            second_logits = logits.new_zeros(len(routes), logits.shape[-1])
        first_logits[as_first] = logits[torch.searchsorted(rows, as_first)]
        second_logits[as_second] = logits[torch.searchsorted(rows, as_second)]
    alone = torch.nonzero((routes != NO_EXPERT) & ~both).flatten()
    if len(alone):
        answer[alone] = fuse(probs[alone], first_logits[alone], fusion)
    paired = torch.nonzero(both).flatten()
    if len(paired):
        answer[paired] = fuse_two(
            probs[paired], first_logits[paired], second_logits[paired], second[1][paired], second[2]
        )
    return answer

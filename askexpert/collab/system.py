"""The collaborative system evaluated from cached logits: the router, its operating point and the baselines.

Inputs are plain tensors (logits per model and split, labels, the partition's coverage) plus a cost model,
so the same code serves the pipeline, `evaluate --run`, the ablations and hand-made unit tests.

Baselines (each {acc, offload_ratio, latency_ms, energy_mj, system_energy_mj}, on test):
- `edge_only`: the generalist answers everything on the edge;
- `edge_medium`: the all-class base model runs on the edge device ("edge execution");
- `full_offload`: every image goes to the base model on the near-edge ("just offload");
- `random_expert`: the same samples as the selected operating point are offloaded, each to a random expert;
- `oracle_expert`: the same samples go to the expert of their true class. With overlapping experts it takes
  an owner that answers right if there is one, and where the router's own choice was right it keeps that
  answer, so it bounds every expert selection from above, the learned one included;
- `static_experts`: the same router, threshold and samples, answered by static experts of the same init.

With `--routing.second_expert.enabled`, the two-expert system is its own operating point (`second_expert`, and
`constrained.second_expert` under the constrained budget), chosen on the same split under the same limits
(`collab/second_expert.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from askexpert.collab import second_expert as pairs
from askexpert.collab.budgets import check_budget
from askexpert.collab.costs import CostModel, ModelCost, SampleCosts
from askexpert.collab.routing import (
    NO_EXPERT,
    check_fusion,
    check_gate,
    check_seed,
    check_threshold,
    check_top_k,
    decide,
    fit_temperature,
    fuse,
)
from askexpert.collab.second_expert import SecondExpert, pair_costs, paired_samples
from askexpert.collab.sweep import (
    RoutedSamples,
    at_mask,
    choose_threshold,
    default_thresholds,
    rows,
    sweep,
)
from askexpert.errors import UserError
from askexpert.files.fields import BadField

NO_CALIBRATION_SPLIT = (
    "choosing the threshold (also the constrained point's) and fitting the temperature need a validation split or "
    "a calibration split: set --data.val_fraction or --data.calib_fraction above 0, or give --routing.threshold, "
    "--routing.temperature false and no --routing.constrained"
)


@dataclass
class Budget:
    """Limits for the operating point, each optional.

    Args:
        offload_ratio: at most this share of samples offloaded (in [0, 1]).
        latency_ms: at most this mean latency per image.
        energy_mj: at most this mean edge-device energy per image.
    """

    offload_ratio: float | None = None
    latency_ms: float | None = None
    energy_mj: float | None = None


@dataclass
class RoutingConfig:
    """How the system routes (`--routing.*`).

    Args:
        gate: confidence gate: max_prob, margin or entropy.
        threshold: offload iff confidence < threshold; None chooses it on the calibration split (the data's
            `calib_fraction`; the validation split when there is none).
        top_k: how many of the generalist's top classes choose the expert.
        temperature: scale the generalist's logits by a temperature fitted on the calibration split (as above).
        fusion: final answer of an offloaded sample: expert, product or mean.
        budget: limits the chosen threshold must meet on the calibration split (unset: no limit).
        constrained: limits of a second operating point, also chosen on the calibration split and reported
            next to the selected one (`constrained` in the report, with the static experts at its threshold);
            unset: none. It answers "what does the system keep under a budget" without a second evaluation.
        second_expert: ask the runner-up expert too when the top-k mass is split (`SecondExpert`).
        seed: seed of the random_expert baseline.
    """

    gate: str = "max_prob"
    threshold: float | None = None
    top_k: int = 3
    temperature: bool = True
    fusion: str = "expert"
    budget: Budget = field(default_factory=lambda: Budget())
    constrained: Budget = field(default_factory=lambda: Budget())
    second_expert: SecondExpert = field(default_factory=lambda: SecondExpert())
    seed: int = 0

    def check(self, num_classes: int) -> None:
        check_gate(self.gate)
        check_threshold(self.threshold)
        check_top_k(self.top_k, num_classes)
        check_fusion(self.fusion)
        check_budget(self.budget_dict())
        check_budget(self.constrained_dict(), "constrained budget")
        try:
            check_seed(self.seed, "--routing.seed")
        except BadField as err:
            raise UserError(str(err)) from None
        self.second_expert.check()

    def budget_dict(self) -> dict[str, float]:
        return _active_limits(self.budget)

    def needs_calibration(self) -> bool:
        """Whether this routing reads the calibration split: to choose τ (for the selected or the constrained
        point) or to fit the temperature."""
        return (
            self.threshold is None or bool(self.temperature) or bool(self.constrained_dict()) or self.chooses_margin()
        )

    def chooses_margin(self) -> bool:
        """Whether the second expert's margin is chosen on the calibration split (enabled, no margin given)."""
        return self.second_expert.enabled and self.second_expert.margin is None

    def constrained_dict(self) -> dict[str, float]:
        return _active_limits(self.constrained)


def _active_limits(budget: Budget | dict | None) -> dict[str, float]:
    """The limits that are set, as a plain dict (a Budget, a dict of one, or None)."""
    values = budget if isinstance(budget, dict) else asdict(budget) if budget is not None else {}
    return {key: value for key, value in values.items() if value is not None}


@dataclass
class ExpertSet:
    """One family of experts (one strategy): logits per split, and what each costs when offloaded to."""

    name: str
    logits: list[dict[str, torch.Tensor]]  # per expert: {split: (N, C or C+1)}
    costs: list[SampleCosts]  # per expert: the extra cost of offloading one sample to it
    models: list[ModelCost] | None = None  # per expert: its model's cost (what asking two experts costs)


def _correct_per_expert(edge_probs: torch.Tensor, experts: ExpertSet, split: str, labels: torch.Tensor, fusion: str):
    """(N, E) bool: would the answer be right if the sample went to expert e."""
    return torch.stack([fuse(edge_probs, e[split], fusion) == labels for e in experts.logits], dim=1)


def _routed(
    conf: torch.Tensor,
    edge_correct: torch.Tensor,
    correct: torch.Tensor,
    assignment: torch.Tensor,
    costs: list[SampleCosts],
    edge: SampleCosts,
) -> RoutedSamples:
    """RoutedSamples for an explicit per-sample expert `assignment` (NO_EXPERT: never offloaded).

    A sample with no expert gets confidence +inf, so `confidence < threshold` (the sweep's test, for every
    threshold at once) is the rule of `EdgeDecision.routes`: unsure and covered by some expert."""
    has_expert = assignment != NO_EXPERT
    index = assignment.clamp_min(0)
    latency = torch.tensor([c.latency_ms for c in costs], dtype=torch.float64)[index]
    energy = torch.tensor([c.edge_energy_mj for c in costs], dtype=torch.float64)[index]
    system = torch.tensor([c.system_energy_mj for c in costs], dtype=torch.float64)[index]
    zero = torch.zeros_like(latency)
    return RoutedSamples(
        confidence=torch.where(has_expert, conf.double(), torch.full_like(conf, float("inf"), dtype=torch.float64)),
        edge_correct=edge_correct,
        offload_correct=correct.gather(1, index[:, None]).squeeze(1) & has_expert,
        offload_latency_ms=torch.where(has_expert, latency, zero),
        offload_energy_mj=torch.where(has_expert, energy, zero),
        offload_system_energy_mj=torch.where(has_expert, system, zero),
        edge=edge,
    )


def selection_grid(conf: torch.Tensor, thresholds: torch.Tensor | None = None, quantiles: int = 101) -> torch.Tensor:
    """Candidate thresholds for choosing the operating point: the regular grid plus the confidence quantiles,
    so a gate whose values crowd into a small interval (e.g. max_prob with 100 classes) is still resolved."""
    grid = default_thresholds() if thresholds is None else thresholds.to(torch.float64)
    finite = conf[torch.isfinite(conf)].to(torch.float64)
    if len(finite):
        grid = torch.cat([grid, finite.quantile(torch.linspace(0, 1, quantiles, dtype=torch.float64))])
    return grid.clamp(0.0, 1.0).unique()


class CollaborativeSystem:
    """Generalist + experts + base model, evaluated from their cached logits."""

    def __init__(
        self,
        generalist: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        coverage: torch.Tensor,
        experts: ExpertSet,
        cost_model: CostModel,
        generalist_cost: ModelCost,
        base: dict[str, torch.Tensor] | None = None,
        base_cost: ModelCost | None = None,
        static_experts: ExpertSet | None = None,
    ) -> None:
        self.generalist, self.labels, self.coverage = generalist, labels, coverage.bool()
        self.experts, self.static_experts = experts, static_experts
        self.base, self.base_cost = base, base_cost
        self.cost_model, self.generalist_cost = cost_model, generalist_cost
        self.num_classes = generalist["test"].shape[-1]
        if len(experts.logits) != coverage.shape[0]:
            raise UserError(f"the partition has {coverage.shape[0]} experts but {len(experts.logits)} were given")
        self.edge = cost_model.on_edge(generalist_cost)

    # -- the router ----------------------------------------------------------------------------------
    @property
    def calibration_split(self) -> str:
        """Where the temperature is fitted and τ chosen: the calibration split when the data has one (it neither
        trained a model nor selected a checkpoint), else the validation split."""
        return "calib" if len(self.labels.get("calib", [])) else "val"

    def temperature(self, config: RoutingConfig) -> float:
        if not config.temperature:
            return 1.0
        split = self.calibration_split
        return fit_temperature(self.generalist[split], self.labels[split])

    def route(self, split: str, config: RoutingConfig, temperature: float, experts: ExpertSet | None = None):
        """(RoutedSamples, per-sample expert choice, (N, E) correctness, edge probabilities) for `split`."""
        experts = experts or self.experts
        labels = self.labels[split]
        decision = decide(self.generalist[split], self.coverage, temperature, config.gate, config.top_k)
        probs, chosen = decision.probs, decision.expert
        correct = _correct_per_expert(probs, experts, split, labels, config.fusion)
        edge_correct = probs.argmax(-1) == labels
        routed = _routed(decision.confidence, edge_correct, correct, chosen, experts.costs, self.edge)
        if config.second_expert.enabled and experts is self.experts:  # the static baselines never ask two
            costs = pair_costs(self.cost_model, experts.models)
            logits = [e[split] for e in experts.logits]
            routed.pair = paired_samples(decision, logits, labels, costs, config.second_expert.fusion)
        return routed, chosen, correct, probs

    # -- the whole evaluation ------------------------------------------------------------------------
    def evaluate(self, config: RoutingConfig, thresholds: torch.Tensor | None = None) -> dict:
        config.check(self.num_classes)
        split = self.calibration_split
        if config.needs_calibration() and len(self.labels.get(split, [])) == 0:
            raise UserError(NO_CALIBRATION_SPLIT)
        temperature = self.temperature(config)
        test, chosen, correct, _ = self.route("test", config, temperature)
        test_table = sweep(test, thresholds)
        calib_table = None
        if config.threshold is None or config.constrained_dict() or config.chooses_margin():
            calib, *_ = self.route(split, config, temperature)
            calib_table = sweep(calib, selection_grid(calib.confidence, thresholds))
        if config.threshold is None:
            threshold = float(
                calib_table["threshold"][choose_threshold(calib_table, config.budget_dict(), "routing.budget")]
            )
            chosen_on = split
        else:
            threshold, chosen_on = float(config.threshold), "given"
        offloaded = test.confidence < threshold
        selected = {"threshold": threshold, **at_mask(test, offloaded), "chosen_on": chosen_on}
        selected["routing_acc"] = self.routing_accuracy(chosen, offloaded)
        routing = {**asdict(config), "budget": config.budget_dict(), "constrained": config.constrained_dict()}
        if not config.second_expert.enabled:  # off, a report reads as it did before the option existed
            del routing["second_expert"]
        report = {
            "routing": {**routing, "temperature_value": temperature},
            "selected": selected,
            "sweep": rows(test_table),
            "baselines": self.baselines(config, temperature, test, chosen, correct, offloaded),
        }
        if config.constrained_dict():
            limits = config.constrained_dict()
            index = choose_threshold(calib_table, limits, "routing.constrained")
            constrained_threshold = float(calib_table["threshold"][index])
            report["constrained"] = self.operating_point(
                config, temperature, test, chosen, constrained_threshold, split, limits
            )
        if config.second_expert.enabled:
            calib_samples = calib if calib_table is not None else None
            self.add_second_expert(report, config, test, chosen, calib_samples, thresholds, split)
        if calib_table is not None:
            report["calibration"] = self.calibration_scores(config, temperature, split, calib, report)
        return report

    def add_second_expert(self, report: dict, config: RoutingConfig, test, chosen, calib, thresholds, split) -> None:
        """The two-expert operating points (`collab/second_expert.py`), chosen on `split` under the same limits."""
        grid = selection_grid(calib.confidence, thresholds) if calib is not None else None

        def owns_class(offloaded, paired):  # some asked expert owns the true class
            return self.routing_accuracy(chosen, offloaded, test.pair.second, paired)

        pairs.add_points(report, config, test, calib, grid, split, owns_class)

    def calibration_scores(self, config, temperature, split: str, calib: RoutedSamples, report: dict) -> dict:
        """The chosen operating points scored on the split that chose them: what tuning may compare (test
        figures are reported, never optimised)."""
        # a given threshold was not chosen on this split: only the points chosen here are scored
        points = {} if config.threshold is not None else {"selected": report["selected"]["threshold"]}
        if "constrained" in report:
            points["constrained"] = report["constrained"]["threshold"]
        static = self.route(split, config, temperature, self.static_experts)[0] if self.static_experts else None
        scores: dict = {"split": split}
        for name, threshold in points.items():
            offloaded = calib.confidence < threshold
            scores[name] = {"acc": at_mask(calib, offloaded)["acc"], "offload_ratio": float(offloaded.double().mean())}
            if static is not None:
                scores[name]["static_experts_acc"] = at_mask(static, offloaded)["acc"]
        scores.update(pairs.calibration_scores(report, calib, split))  # the two-expert points chosen here
        return scores

    def operating_point(self, config, temperature, test: RoutedSamples, chosen, threshold, chosen_on, limits) -> dict:
        """The system at `threshold` on test, with the static experts at the same threshold when there are any."""
        offloaded = test.confidence < threshold
        point = {"threshold": threshold, "budget": limits, "chosen_on": chosen_on, **at_mask(test, offloaded)}
        point["routing_acc"] = self.routing_accuracy(chosen, offloaded)
        if self.static_experts is not None:
            static, *_ = self.route("test", config, temperature, self.static_experts)
            point["static_experts"] = at_mask(static, offloaded)
        return point

    def baselines(self, config, temperature, test: RoutedSamples, chosen, correct, offloaded) -> dict:
        labels = self.labels["test"]
        n, num_experts = len(labels), len(self.experts.logits)
        out = {"edge_only": {**at_mask(test, torch.zeros(n, dtype=torch.bool))}}
        if self.base is not None and self.base_cost is not None:
            base_acc = float((self.base["test"][:, : self.num_classes].argmax(-1) == labels).double().mean())
            on_edge = self.cost_model.on_edge(self.base_cost)
            remote = self.cost_model.offload(self.base_cost)
            out["edge_medium"] = {"acc": base_acc, "offload_ratio": 0.0, **on_edge.as_dict()}
            out["full_offload"] = {"acc": base_acc, "offload_ratio": 1.0, **remote.as_dict()}
        generator = torch.Generator().manual_seed(config.seed)
        random_choice = torch.randint(num_experts, (n,), generator=generator)
        random_choice = torch.where(chosen == NO_EXPERT, chosen, random_choice)
        random = _routed(test.confidence, test.edge_correct, correct, random_choice, self.experts.costs, self.edge)
        out["random_expert"] = at_mask(random, offloaded)
        owners = self.coverage.T[labels]  # (N, E): experts that own the true class
        owner = torch.where(owners.any(1), owners.float().argmax(1), chosen)
        oracle = _routed(test.confidence, test.edge_correct, correct, owner, self.experts.costs, self.edge)
        oracle_correct = (correct & owners).any(1) | test.offload_correct
        out["oracle_expert"] = at_mask(oracle, offloaded, oracle_correct)
        if self.static_experts is not None:
            static, *_ = self.route("test", config, temperature, self.static_experts)
            out["static_experts"] = at_mask(static, offloaded)
        return out

    def routing_accuracy(
        self,
        chosen: torch.Tensor,
        offloaded: torch.Tensor,
        second: torch.Tensor | None = None,
        paired: torch.Tensor | None = None,
    ) -> float | None:
        """Share of the offloaded test samples sent to an expert that owns their true class (None: none sent);
        with `second` (runner-up per sample) and `paired` (where it was asked too), to either of the two."""
        if not offloaded.any():
            return None
        labels = self.labels["test"]
        right = self.coverage[chosen.clamp_min(0), labels] & (chosen != NO_EXPERT)
        if second is not None:
            right |= self.coverage[second.clamp_min(0), labels] & paired & (second != NO_EXPERT)
        return float(right[offloaded].double().mean())

    def subset_accuracy(self, experts: ExpertSet, index: int, split: str = "test") -> tuple[float, float]:
        """(expert, generalist) accuracy on the `split` images of expert `index`'s classes (argmax over all
        classes; a dustbin expert's "other" answer counts as wrong)."""
        labels = self.labels[split]
        inside = self.coverage[index][labels]
        if not inside.any():
            return float("nan"), float("nan")
        logits = experts.logits[index][split][inside]
        expert_acc = (logits.argmax(-1) == labels[inside]).double().mean()
        generalist_acc = (self.generalist[split][inside].argmax(-1) == labels[inside]).double().mean()
        return float(expert_acc), float(generalist_acc)

"""The router, the threshold sweep and the cost model, on hand-made tensors (no training)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.routing import COVER, PROFILE

from askexpert.collab.costs import CostModel, ModelCost, profile_from_dict
from askexpert.collab.routing import (
    GATES,
    NO_EXPERT,
    confidence,
    decide,
    fit_temperature,
    fuse,
    fused_answers,
    select_experts,
)
from askexpert.collab.sweep import RoutedSamples, at_mask, choose_threshold, sweep
from askexpert.collab.system import Budget, CollaborativeSystem, ExpertSet, RoutingConfig
from askexpert.errors import UserError


def probs(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- gates ---------------------------------------------------------------------------------------------
def test_gates_on_hand_made_probabilities():
    p = probs([0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0])
    assert confidence(p, "max_prob").tolist() == pytest.approx([0.7, 0.25, 1.0])
    assert confidence(p, "margin").tolist() == pytest.approx([0.5, 0.0, 1.0])
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert confidence(p, "entropy").tolist() == pytest.approx([1 - h / math.log(4), 0.0, 1.0], abs=1e-9)


@pytest.mark.parametrize("gate", GATES)
def test_every_gate_is_in_unit_interval(gate):
    p = torch.randn(500, 10).mul(3).softmax(-1)
    c = confidence(p, gate)
    assert c.shape == (500,) and bool((c >= 0).all() and (c <= 1).all())


def test_unknown_gate_lists_the_gates():
    with pytest.raises(UserError, match="unknown gate 'foo'; gates: max_prob, margin, entropy"):
        confidence(probs([0.5, 0.5]), "foo")


def test_temperature_recovers_the_scale_of_overconfident_logits():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 10) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    fitted = fit_temperature(true_logits * 3, labels)  # 3x overconfident
    assert fitted == pytest.approx(3.0, rel=0.1)


def test_top_k_mass_chooses_the_expert():
    # top-1 is class 0 (expert 0), but classes 2 and 3 (expert 1) hold more of the top-3 mass
    p = probs([0.30, 0.0, 0.25, 0.24, 0.21, 0.0])
    assert select_experts(p, COVER, top_k=1).tolist() == [0]
    assert select_experts(p, COVER, top_k=3).tolist() == [1]


def test_ties_go_to_the_owner_of_the_top1_class():
    # top-2 mass: expert 1 has 0.3 (class 2) and expert 2 has 0.3 (class 4); top-1 is class 4 by a hair
    p = probs([0.0, 0.0, 0.3, 0.0, 0.3 + 1e-9, 0.4 - 1e-9])
    p2 = probs([0.1, 0.0, 0.35, 0.0, 0.35, 0.2])  # exact tie 2 vs 4 among the top-2; top-1 is class 2 (first)
    assert select_experts(p, COVER, top_k=2).tolist() == [2]
    top1 = int(p2.argmax())
    assert select_experts(p2, COVER, top_k=2).tolist() == [int(COVER[:, top1].nonzero())]


def test_overlapping_experts_tie_on_total_mass_then_lowest_index():
    cover = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)  # class 0 is everyone's
    p = probs([0.6, 0.1, 0.1, 0.2])
    # top-1: class 0, owned by all three; all tie on the top-1 mass; expert 0 holds most in total (0.8)
    assert select_experts(p, cover, top_k=1).tolist() == [0]
    p = probs([0.6, 0.05, 0.05, 0.3])
    assert select_experts(p, cover, top_k=1).tolist() == [1]  # expert 1 holds 0.9 in total
    only = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    assert select_experts(probs([0.7, 0.3]), only, top_k=1).tolist() == [0]  # everything equal: lowest index


def test_samples_without_any_covering_expert_stay_on_the_edge():
    cover = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)  # classes 2, 3 uncovered
    assert select_experts(probs([0.1, 0.0, 0.5, 0.4]), cover, top_k=2).tolist() == [NO_EXPERT]
    assert select_experts(probs([0.1, 0.0, 0.5, 0.4]), cover, top_k=3).tolist() == [0]


@pytest.mark.parametrize("k", [0, 7])
def test_top_k_out_of_range(k):
    with pytest.raises(UserError, match="top_k must be between 1 and the number of classes"):
        select_experts(probs([0.5, 0.5, 0, 0, 0, 0]), COVER, top_k=k)


# -- the one decision every caller makes --------------------------------------------------------------------
@pytest.mark.parametrize("gate", GATES)
def test_decide_is_temperature_gate_and_router_and_routes_only_unsure_covered_samples(gate):
    logits = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 3
    cover = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)  # classes 2, 3 uncovered: some samples have no expert
    decision = decide(logits, cover, 1.7, gate, 1)
    expected = (logits.double() / 1.7).softmax(-1)  # in float64, as the report, `route`, `export` and `edge` did
    assert torch.equal(decision.probs, expected)
    assert torch.equal(decision.confidence, confidence(expected, gate))
    assert torch.equal(decision.expert, select_experts(expected, cover, 1))
    assert (decision.expert == NO_EXPERT).any() and (decision.expert == 0).any()
    for threshold in (0.0, 0.5, 1.0):
        routes = decision.routes(threshold)
        offloaded = (decision.confidence < threshold) & (decision.expert != NO_EXPERT)
        assert torch.equal(routes != NO_EXPERT, offloaded)
        assert torch.equal(routes[offloaded], decision.expert[offloaded])
    assert (decision.routes(0.0) == NO_EXPERT).all()


def test_fused_answers_ask_each_routed_expert_once_in_index_order():
    edge = probs([0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.0, 0.55, 0.45], [0.5, 0.2, 0.3])
    routes = torch.tensor([1, NO_EXPERT, 0, 1])
    asked = []

    def expert_logits(e, rows):
        asked.append((e, rows.tolist()))
        return torch.log(probs(*[[0.1, 0.1, 0.8] if e else [0.8, 0.1, 0.1]] * len(rows)))

    answers = fused_answers(edge, routes, expert_logits, "expert")
    assert asked == [(0, [2]), (1, [0, 3])]
    assert answers.tolist() == [2, 2, 0, 2]  # image 1 keeps the edge's answer


# -- fusion ----------------------------------------------------------------------------------------------
def test_fusion_modes_and_dustbin_hand_back():
    edge = probs([0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.0, 0.55, 0.45])
    expert = torch.log(probs([0.1, 0.5, 0.4], [0.45, 0.1, 0.45], [0.95, 1e-9, 0.05]))
    assert fuse(edge, expert, "expert").tolist() == [1, 0, 0]
    # products 0.06 / 0.20 / 0, 0.09 / 0.03 / 0.225 and 0 / 0 / 0.0225
    assert fuse(edge, expert, "product").tolist() == [1, 2, 2]
    # sums 0.70 / 0.90 / 0.40, 0.65 / 0.40 / 0.95 and 0.95 / 0.55 / 0.50
    assert fuse(edge, expert, "mean").tolist() == [1, 2, 0]
    dustbin = torch.log(probs([0.1, 0.1, 0.1, 0.7], [0.6, 0.1, 0.1, 0.2], [0.1, 0.1, 0.1, 0.7]))
    assert fuse(edge, dustbin, "expert").tolist() == [0, 0, 1]  # "other" falls back to the edge's answer
    with pytest.raises(UserError, match="unknown fusion"):
        fuse(edge, expert, "vote")


# -- the sweep ---------------------------------------------------------------------------------------------
def random_samples(n=2000, seed=0) -> RoutedSamples:
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, generator=g)
    conf[:50] = 1.0  # perfectly sure samples
    conf[50:60] = float("inf")  # no expert
    cost = torch.rand(n, generator=g) * 10
    from askexpert.collab.costs import SampleCosts

    return RoutedSamples(
        confidence=conf.double(),
        edge_correct=torch.rand(n, generator=g) < conf.clamp(max=1),
        offload_correct=torch.rand(n, generator=g) < 0.6,
        offload_latency_ms=cost.double(),
        offload_energy_mj=(cost * 2).double(),
        offload_system_energy_mj=(cost * 5).double(),
        edge=SampleCosts(1.5, 7.0, 7.0),
    )


def test_threshold_zero_offloads_nothing_and_one_offloads_every_unsure_sample():
    samples = random_samples()
    table = sweep(samples)
    assert table["offload_ratio"][0] == 0.0
    assert table["acc"][0] == pytest.approx(float(samples.edge_correct.double().mean()))
    assert table["latency_ms"][0] == pytest.approx(1.5)
    unsure = samples.confidence < 1.0
    assert table["offload_ratio"][-1] == pytest.approx(float(unsure.double().mean()))
    assert float(unsure.double().mean()) == pytest.approx(1 - 60 / 2000)  # sure and expert-less ones stay


def test_offload_ratio_is_monotone_in_the_threshold():
    table = sweep(random_samples(), torch.rand(300).sort().values)
    assert bool((table["offload_ratio"].diff() >= 0).all())
    assert bool((table["latency_ms"].diff() >= 0).all())


def test_sweep_equals_evaluating_each_threshold_directly():
    samples = random_samples(seed=3)
    thresholds = torch.linspace(0, 1, 41, dtype=torch.float64)
    table = sweep(samples, thresholds)
    for i, t in enumerate(thresholds):
        direct = at_mask(samples, samples.confidence < t)
        for key in ("offload_ratio", "acc", "latency_ms", "energy_mj", "system_energy_mj"):
            assert float(table[key][i]) == pytest.approx(direct[key], abs=1e-9), (key, float(t))


def test_operating_point_is_the_best_within_the_budget():
    table = {
        "threshold": torch.tensor([0.0, 0.5, 1.0]),
        "offload_ratio": torch.tensor([0.0, 0.3, 0.9]),
        "acc": torch.tensor([0.5, 0.7, 0.7]),
        "latency_ms": torch.tensor([1.0, 4.0, 9.0]),
        "energy_mj": torch.tensor([5.0, 6.0, 8.0]),
    }
    assert choose_threshold(table) == 1  # tie on accuracy: offload less
    assert choose_threshold(table, {"offload_ratio": 0.2}) == 0
    assert choose_threshold(table, {"latency_ms": 5.0, "energy_mj": None}) == 1
    with pytest.raises(UserError, match="no threshold meets the budget"):
        choose_threshold(table, {"energy_mj": 1.0})
    with pytest.raises(UserError, match="budget offload_ratio must be in"):
        choose_threshold(table, {"offload_ratio": 2.0})


# -- costs -----------------------------------------------------------------------------------------------
def test_cost_model_on_a_hand_computed_example():
    profile = profile_from_dict(PROFILE)
    model = CostModel(profile, (3, 32, 32))
    generalist = ModelCost("g", 0.02, *[1.0 + 1e3 * 0.02 / 10.0, 3.0 + 1e3 * 0.02 / 1000.0], "flops", "flops")
    expert = ModelCost("e", 0.5, 1.0 + 50.0, 3.0 + 0.5, "flops", "flops")
    edge = model.on_edge(generalist)
    assert edge.latency_ms == pytest.approx(3.0)  # 1 ms overhead + 0.02 GFLOP / 10 GFLOP/s
    assert edge.edge_energy_mj == pytest.approx(15.0)  # 5 W x 3 ms
    off = model.offload(expert)
    transfer = 3072 * 8 / 24e3  # 1.024 ms at 24 Mbit/s
    assert off.latency_ms == pytest.approx(transfer + 4.0 + 3.5)
    radio = 0.25 * 24 + 1.0  # 7 W
    assert off.edge_energy_mj == pytest.approx(radio * transfer + 2.0 * (transfer + 4.0 + 3.5))
    assert off.system_energy_mj == pytest.approx(off.edge_energy_mj + 30.0 * 3.5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["edge"].pop("gflops"), "profile section 'edge' misses gflops"),
        (lambda p: p["link"].update(rtt_ms=-1), "link.rtt_ms must be non-negative"),
        (lambda p: p["near_edge"].update(gflops=0), "near_edge.gflops must be positive"),
        (lambda p: p.pop("link"), "the profile has no 'link' section"),
        (lambda p: p["edge"].update(active_power_w="lots"), "edge.active_power_w must be a number"),
        (lambda p: p["link"].update(measured_ms={"m": 1.0}), "section 'link' has unknown fields measured_ms"),
        (lambda p: p["edge"].update(name=""), "edge.name must be a non-empty text"),
    ],
)
def test_bad_profiles_are_refused(change, message):
    import copy

    raw = copy.deepcopy(PROFILE)
    change(raw)
    with pytest.raises(UserError, match=message):
        profile_from_dict(raw)


# -- the whole system on hand-made logits ------------------------------------------------------------------
def make_system(seed=0, n=600, static=True):
    """6 classes, 3 experts of 2; experts good on their own classes, the generalist mediocre."""
    g = torch.Generator().manual_seed(seed)
    labels = {s: torch.randint(6, (n,), generator=g) for s in ("val", "test")}

    def noisy(strength, own=None):
        out = {}
        for s, y in labels.items():
            logits = torch.randn(n, 6, generator=g)
            boost = torch.full((n,), strength)
            if own is not None:
                boost = torch.where(COVER[own][y], boost, torch.zeros(n))
            logits[torch.arange(n), y] += boost
            out[s] = logits
        return out

    profile = profile_from_dict(PROFILE)
    cost_model = CostModel(profile)
    small = ModelCost("g", 0.02, 3.0, 3.02, "flops", "flops")
    big = ModelCost("e", 0.5, 51.0, 3.5, "flops", "flops")
    experts = ExpertSet("progressive", [noisy(4.0, e) for e in range(3)], [cost_model.offload(big)] * 3)
    statics = ExpertSet("static", [noisy(2.0, e) for e in range(3)], [cost_model.offload(big)] * 3) if static else None
    return CollaborativeSystem(noisy(1.0), labels, COVER, experts, cost_model, small, noisy(2.0), big, statics)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_is_never_below_the_learned_routing(gate, seed):
    system = make_system(seed)
    for threshold in (0.2, 0.5, 0.9, 1.0):
        report = system.evaluate(RoutingConfig(gate=gate, threshold=threshold, top_k=2))
        assert report["baselines"]["oracle_expert"]["acc"] >= report["selected"]["acc"]
        assert report["baselines"]["oracle_expert"]["offload_ratio"] == report["selected"]["offload_ratio"]
        assert report["baselines"]["random_expert"]["offload_ratio"] == report["selected"]["offload_ratio"]


def test_evaluation_report_fields_and_choice_on_validation():
    system = make_system()
    report = system.evaluate(RoutingConfig(budget=Budget(offload_ratio=0.5)))
    assert report["selected"]["chosen_on"] == "val"
    assert 0.34 < report["selected"]["routing_acc"] <= 1  # better than a random pick of 3 experts
    assert report["selected"]["offload_ratio"] <= 0.6  # the budget holds on val; test is close
    assert set(report["baselines"]) == {
        "edge_only",
        "edge_medium",
        "full_offload",
        "random_expert",
        "oracle_expert",
        "static_experts",
    }
    for entry in [report["selected"], *report["baselines"].values()]:
        assert {"acc", "offload_ratio", "latency_ms", "energy_mj", "system_energy_mj"} <= set(entry)
    assert len(report["sweep"]) == 101 and report["sweep"][0]["threshold"] == 0.0
    b = report["baselines"]
    assert b["full_offload"]["offload_ratio"] == 1.0 and b["edge_medium"]["offload_ratio"] == 0.0
    assert b["edge_medium"]["latency_ms"] == pytest.approx(51.0)
    # experts trained on their classes beat random experts on the same samples
    assert report["selected"]["acc"] > b["random_expert"]["acc"]
    assert report["selected"]["acc"] > b["edge_only"]["acc"]


def test_routing_settings_are_checked():
    system = make_system(static=False)
    with pytest.raises(UserError, match=r"threshold must be in \[0, 1\], got 1.5"):
        system.evaluate(RoutingConfig(threshold=1.5))
    with pytest.raises(UserError, match="top_k must be between 1 and the number of classes \\(6\\), got 9"):
        system.evaluate(RoutingConfig(top_k=9))
    with pytest.raises(UserError, match="unknown gate"):
        system.evaluate(RoutingConfig(gate="vibes"))
    with pytest.raises(UserError, match="unknown budget"):
        system.evaluate(RoutingConfig(budget={"money": 3}))

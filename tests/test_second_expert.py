"""The second expert on hand-made probabilities: when it is asked, how two answers fuse, what the pair costs,
and that the vectorised τ x margin sweep equals evaluating every setting one by one."""

from __future__ import annotations

import pytest
import torch
from helpers.routing import COVER, PROFILE
from test_routing import make_system

from askexpert.collab.costs import CostModel, ModelCost, SampleCosts, profile_from_dict
from askexpert.collab.routing import NO_EXPERT, decide, fuse, fuse_two, fused_answers
from askexpert.collab.second_expert import SecondExpert, pair_mask
from askexpert.collab.sweep import PairedSamples, RoutedSamples, at_mask, choose_threshold, sweep_two
from askexpert.collab.system import Budget, RoutingConfig
from askexpert.errors import UserError


def logits_of(*rows):
    """Logits whose softmax (temperature 1) is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log()


# -- who is asked -------------------------------------------------------------------------------------------
def test_runner_up_and_mass_gap_on_hand_made_probabilities():
    # top-3 classes 0 (0.40), 2 (0.35), 1 (0.15): expert 0 owns 0.55, expert 1 owns 0.35 of the top-3 mass 0.90
    torn = [0.40, 0.15, 0.35, 0.05, 0.03, 0.02]
    # top-3 classes 0, 1 (expert 0) and 2 (expert 1, 0.04)
    sure = [0.80, 0.14, 0.04, 0.01, 0.005, 0.005]
    decision = decide(logits_of(torn, sure), COVER, 1.0, "max_prob", 3)
    assert decision.expert.tolist() == [0, 0]
    assert decision.second.tolist() == [1, 1]
    assert decision.gap.tolist() == pytest.approx([(0.55 - 0.35) / 0.90, (0.94 - 0.04) / 0.98])
    assert decision.mass.flatten().tolist() == pytest.approx([0.55, 0.35, 0.94, 0.04])
    # top-1 only: nobody but expert 0 holds mass
    alone = decide(logits_of(sure), COVER, 1.0, "max_prob", 1)
    assert alone.second.tolist() == [NO_EXPERT] and alone.gap.tolist() == [float("inf")]


def test_second_expert_is_asked_only_when_offloaded_and_torn():
    torn = [0.40, 0.15, 0.35, 0.05, 0.03, 0.02]  # confidence 0.40, gap 0.22
    sure = [0.80, 0.14, 0.04, 0.01, 0.005, 0.005]  # confidence 0.80, gap 0.92
    decision = decide(logits_of(torn, sure), COVER, 1.0, "max_prob", 3)
    assert decision.second_routes(0.9, 0.3).tolist() == [1, NO_EXPERT]  # sure's runner-up is too far behind
    assert decision.second_routes(0.9, 1.0).tolist() == [1, 1]  # margin 1: any runner-up with some mass
    assert decision.second_routes(0.5, 1.0).tolist() == [1, NO_EXPERT]  # sure stays on the edge
    assert decision.second_routes(0.3, 1.0).tolist() == [NO_EXPERT, NO_EXPERT]  # nothing offloaded
    for never in (0.0, None):
        assert decision.second_routes(0.9, never).tolist() == [NO_EXPERT, NO_EXPERT]
    assert decision.second_routes(0.9, 0.2).tolist() == [NO_EXPERT, NO_EXPERT]  # gap 0.22 is not below 0.2


# -- how two answers fuse ----------------------------------------------------------------------------------
EDGE = torch.tensor([[0.1, 0.5, 0.4]], dtype=torch.float64)


def test_mass_fusion_follows_the_expert_that_owns_more_of_the_top_k():
    a = torch.tensor([[0.9, 0.05, 0.05]]).log()  # says class 0
    b = torch.tensor([[0.05, 0.05, 0.9]]).log()  # says class 2
    assert fuse_two(EDGE, a, b, torch.tensor([[0.6, 0.3]]), "mass").tolist() == [0]
    assert fuse_two(EDGE, a, b, torch.tensor([[0.3, 0.6]]), "mass").tolist() == [2]
    # equal weights: the more confident answer wins; product and mean also hear the generalist
    a_soft = torch.tensor([[0.6, 0.3, 0.1]]).log()
    assert fuse_two(EDGE, a_soft, b, torch.tensor([[0.9, 0.1]]), "expert").tolist() == [2]
    assert fuse_two(EDGE, a_soft, b, torch.tensor([[0.9, 0.1]]), "mean").tolist() == [2]
    both_unsure = torch.tensor([[0.4, 0.35, 0.25]]).log(), torch.tensor([[0.25, 0.35, 0.4]]).log()
    assert fuse_two(EDGE, *both_unsure, torch.tensor([[0.5, 0.5]]), "product").tolist() == [1]


def test_a_dustbin_answer_drops_out_and_two_give_the_generalist_back():
    says_other = torch.tensor([[0.05, 0.05, 0.05, 0.85]]).log()  # C + 1 outputs: "other" wins
    says_two = torch.tensor([[0.05, 0.05, 0.8, 0.1]]).log()
    mass = torch.tensor([[0.9, 0.1]])  # the "other" expert owned most of the mass: it still drops out
    assert fuse_two(EDGE, says_other, says_two, mass, "mass").tolist() == [2]
    assert fuse_two(EDGE, says_other, says_other, mass, "mass").tolist() == [1]  # the generalist's answer


def test_unknown_second_fusion_and_margin_are_refused():
    with pytest.raises(UserError, match="unknown second-expert fusion 'vote'"):
        fuse_two(EDGE, EDGE.log(), EDGE.log(), torch.tensor([[0.5, 0.5]]), "vote")
    with pytest.raises(UserError, match="margin must be in \\[0, 1\\], got 1.5"):
        RoutingConfig(second_expert=SecondExpert(enabled=True, margin=1.5)).check(6)


def test_fused_answers_asks_each_expert_once_and_fuses_pairs():
    g = torch.Generator().manual_seed(0)
    generalist = torch.randn(40, 6, generator=g) * 2
    experts = [torch.randn(40, 6, generator=g) * 3 for _ in range(3)]
    decision = decide(generalist, COVER, 1.0, "max_prob", 3)
    routes, second = decision.routes(0.8), decision.second_routes(0.8, 0.6)
    assert (second != NO_EXPERT).any() and ((routes != NO_EXPERT) & (second == NO_EXPERT)).any()
    asked = []

    def expert_logits(e, rows):
        asked.append(e)
        return experts[e][rows]

    answers = fused_answers(decision.probs, routes, expert_logits, "expert", (second, decision.mass, "mass"))
    assert sorted(asked) == sorted(set(asked))  # once per expert
    for i in range(40):
        if second[i] != NO_EXPERT:
            pair = experts[int(routes[i])][i : i + 1], experts[int(second[i])][i : i + 1]
            expected = fuse_two(decision.probs[i : i + 1], *pair, decision.mass[i : i + 1], "mass")
        elif routes[i] != NO_EXPERT:
            expected = fuse(decision.probs[i : i + 1], experts[int(routes[i])][i : i + 1], "expert")
        else:
            expected = decision.probs[i : i + 1].argmax(-1)
        assert int(answers[i]) == int(expected)
    # without a second route the answers are the one-expert ones
    assert torch.equal(
        fused_answers(decision.probs, routes, expert_logits, "expert"),
        fused_answers(decision.probs, routes, expert_logits, "expert", (torch.full_like(routes, -1), None, "mass")),
    )


# -- what the pair costs -----------------------------------------------------------------------------------
def test_a_pair_sends_the_image_twice_waits_once_and_pays_both_experts():
    cost_model = CostModel(profile_from_dict(PROFILE))
    a = ModelCost("a", 0.5, 51.0, 3.5, "flops", "flops")
    b = ModelCost("b", 0.9, 90.0, 6.0, "flops", "flops")
    link, edge, near = cost_model.profile.link, cost_model.profile.edge, cost_model.profile.near_edge
    transfer = link.transfer_ms(3 * 32 * 32)
    pair = cost_model.offload_pair(a, b)
    assert pair.latency_ms == pytest.approx(2 * transfer + link.rtt_ms + 3.5 + 6.0)
    edge_energy = link.radio_power_w * 2 * transfer + edge.idle_power_w * pair.latency_ms
    assert pair.edge_energy_mj == pytest.approx(edge_energy)
    assert pair.system_energy_mj == pytest.approx(edge_energy + near.active_power_w * 9.5)
    one = cost_model.offload(a)
    assert one.latency_ms < pair.latency_ms < 2 * max(one.latency_ms, cost_model.offload(b).latency_ms)


# -- the sweep ---------------------------------------------------------------------------------------------
def paired_random_samples(n=1500, seed=0) -> RoutedSamples:
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, generator=g).double()
    conf[:30] = float("inf")  # no expert
    gap = torch.rand(n, generator=g).double()
    gap[30:100] = float("inf")  # no runner-up
    cost = torch.rand(n, generator=g).double() * 10
    return RoutedSamples(
        confidence=conf,
        edge_correct=torch.rand(n, generator=g) < 0.4,
        offload_correct=torch.rand(n, generator=g) < 0.6,
        offload_latency_ms=cost,
        offload_energy_mj=cost * 2,
        offload_system_energy_mj=cost * 5,
        edge=SampleCosts(1.5, 7.0, 7.0),
        pair=PairedSamples(
            gap=gap,
            second=torch.zeros(n, dtype=torch.long),
            correct=torch.rand(n, generator=g) < 0.7,
            latency_ms=cost * 1.7,
            energy_mj=cost * 3,
            system_energy_mj=cost * 9,
        ),
    )


def test_vectorised_sweep_equals_a_loop_over_every_setting():
    samples = paired_random_samples()
    thresholds = torch.linspace(0, 1, 11, dtype=torch.float64)
    margins = torch.linspace(0, 1, 6, dtype=torch.float64)
    table = sweep_two(samples, thresholds, margins)
    assert len(table["acc"]) == 66
    i = 0
    for threshold in thresholds.tolist():
        for margin in margins.tolist():
            offloaded, paired = pair_mask(samples, threshold, margin)
            expected = at_mask(samples, offloaded, paired=paired)
            assert table["threshold"][i] == threshold and table["margin"][i] == margin
            for key, value in expected.items():
                assert float(table[key][i]) == pytest.approx(value, abs=1e-9), (threshold, margin, key)
            i += 1


def test_margin_zero_is_the_one_expert_sweep_and_choice_prefers_fewer_pairs():
    samples = paired_random_samples()
    table = sweep_two(samples, None, torch.tensor([0.0]))
    assert table["second_ratio"].abs().max() == 0
    from askexpert.collab.sweep import sweep

    one = sweep(samples)
    for key in ("acc", "latency_ms", "energy_mj", "offload_ratio"):
        assert torch.allclose(table[key], one[key])
    # when pairing never changes correctness, the most accurate point asks no second expert
    samples.pair.correct = samples.offload_correct.clone()
    full = sweep_two(samples)
    assert full["second_ratio"][choose_threshold(full)] == 0


# -- the system's report -----------------------------------------------------------------------------------
def with_model_costs(system):
    big = ModelCost("e", 0.5, 51.0, 3.5, "flops", "flops")
    for experts in (system.experts, system.static_experts):
        if experts is not None:
            experts.models = [big] * len(experts.logits)
    return system


def test_report_has_its_own_second_expert_row_chosen_under_the_same_budget():
    system = with_model_costs(make_system())
    config = RoutingConfig(
        budget=Budget(latency_ms=20.0),
        constrained=Budget(offload_ratio=0.3),
        second_expert=SecondExpert(enabled=True),
    )
    report = system.evaluate(config)
    pair = report["second_expert"]
    assert pair["chosen_on"] == "val" and 0 <= pair["margin"] <= 1 and 0 <= pair["second_ratio"] <= 1
    assert pair["second_ratio"] <= pair["offload_ratio"]
    assert report["constrained"]["second_expert"]["offload_ratio"] <= report["constrained"]["offload_ratio"] + 0.05
    # the budget binds the pair on the split that chose it: its validation latency is within 20 ms
    val, *_ = system.route("val", config, report["routing"]["temperature_value"])
    offloaded, paired = pair_mask(val, pair["threshold"], pair["margin"])
    assert at_mask(val, offloaded, paired=paired)["latency_ms"] <= 20.0 + 1e-9
    # both two-expert points are scored on the split that chose them too (what tuning may compare)
    scored = report["calibration"]["second_expert"]
    assert scored["acc"] == at_mask(val, offloaded, paired=paired)["acc"] and 0 <= scored["second_ratio"] <= 1
    assert set(report["calibration"]["constrained_second_expert"]) == {"acc", "offload_ratio", "second_ratio"}
    from askexpert.collab.report import headline_table

    assert "**askexpert + second expert**" in headline_table(report)


def test_given_margin_zero_reproduces_the_one_expert_point():
    system = with_model_costs(make_system())
    report = system.evaluate(RoutingConfig(second_expert=SecondExpert(enabled=True, margin=0.0)))
    for key in ("threshold", "acc", "offload_ratio", "latency_ms", "energy_mj"):
        assert report["second_expert"][key] == pytest.approx(report["selected"][key])
    assert report["second_expert"]["second_ratio"] == 0


def test_asking_more_experts_never_lowers_routing_accuracy():
    system = with_model_costs(make_system())
    report = system.evaluate(RoutingConfig(threshold=0.8, second_expert=SecondExpert(enabled=True, margin=1.0)))
    pair, one = report["second_expert"], report["selected"]
    assert pair["threshold"] == one["threshold"] == 0.8 and pair["chosen_on"] == "given"
    assert pair["second_ratio"] > 0
    assert pair["routing_acc"] > one["routing_acc"]


def test_second_expert_without_model_costs_is_one_clear_error():
    system = make_system()
    with pytest.raises(UserError, match="needs each expert's model cost"):
        system.evaluate(RoutingConfig(second_expert=SecondExpert(enabled=True)))
    assert "second_expert" not in system.evaluate(RoutingConfig())

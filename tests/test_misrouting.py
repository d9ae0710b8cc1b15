"""experiments/misrouting.py: the experts' accuracy as routing gets worse, from cached logits."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, load_script


@pytest.fixture(scope="module")
def misrouting():
    return load_script(REPO / "experiments" / "misrouting.py")


def test_accuracy_falls_with_misrouting_only_for_experts_that_forgot_the_other_classes(misrouting):
    labels = torch.arange(4).repeat(50)  # 200 images of 4 classes
    coverage = torch.tensor([[True, True, False, False], [False, False, True, True]])
    everywhere = torch.nn.functional.one_hot(labels, 4).float()  # right on every image
    forgetful = [everywhere * coverage[e] for e in range(2)]  # right on its own classes only (argmax 0 elsewhere)
    keeps = misrouting.accuracy_by_misrouting([everywhere, everywhere], labels, coverage, [0.0, 0.5, 1.0])
    forgets = misrouting.accuracy_by_misrouting(forgetful, labels, coverage, [0.0, 0.5, 1.0])
    assert keeps == [1.0, 1.0, 1.0]
    # misrouted images of classes 1-3 are wrong for a forgetful expert (class 0's argmax is 0 by accident)
    assert forgets[0] == 1.0 and forgets[2] == pytest.approx(0.25)
    assert 0.25 < forgets[1] < 1.0


def test_crossover_is_the_first_rate_where_progressive_catches_up(misrouting):
    rates = misrouting.RATES
    static = [0.6 - 0.5 * r for r in rates]
    progressive = [0.57 - 0.05 * r for r in rates]
    assert misrouting.crossover(progressive, static) == pytest.approx(0.07)  # 0.45 r >= 0.03 from r = 6.7 %
    assert misrouting.crossover([0.1] * len(rates), [0.5] * len(rates)) is None


def test_the_routers_own_mistakes_split_the_difference_to_static_experts(misrouting):
    from askexpert.collab.costs import CostModel, load_profile, model_cost
    from askexpert.collab.system import CollaborativeSystem, ExpertSet, RoutingConfig

    generator = torch.Generator().manual_seed(0)
    n, classes = 800, 4
    coverage = torch.tensor([[True, True, False, False], [False, False, True, True]])
    labels = {s: torch.randint(classes, (n,), generator=generator) for s in ("val", "test")}

    def logits(strength: float, elsewhere: float, own: int | None = None) -> dict:
        out = {}
        for split, y in labels.items():
            boost = torch.full((n,), strength)
            if own is not None:
                boost = torch.where(coverage[own][y], boost, torch.full((n,), elsewhere))
            x = torch.randn(n, classes, generator=generator)
            x[torch.arange(n), y] += boost
            out[split] = x
        return out

    profile = load_profile(str(REPO / "configs" / "profiles" / "pi4_wifi_orin.yaml"))
    cost_model = CostModel(profile)
    small = model_cost(profile, "vit_micro_patch8_32", classes)
    offload = [cost_model.offload(model_cost(profile, "vit_mini_patch8_32", classes))] * 2
    ours = ExpertSet("progressive", [logits(3.0, 1.5, e) for e in range(2)], offload)  # keeps the other classes
    static = ExpertSet("static", [logits(4.0, 0.0, e) for e in range(2)], offload)  # knows only its own
    system = CollaborativeSystem(logits(0.8, 0.0), labels, coverage, ours, cost_model, small, static_experts=static)
    config = RoutingConfig(top_k=1)
    report = system.evaluate(config)
    found = misrouting.at_the_router(system, config, report)
    owner, wrong = found["to_owner"], found["misrouted"]
    assert owner["images"] + wrong["images"] == found["offloaded"] == round(n * report["selected"]["offload_ratio"])
    assert wrong["images"] > 0 and wrong["static"] < wrong["progressive"]  # forgetting hurts only when misrouted
    assert owner["static"] > owner["progressive"]
    # the two parts add up to the system's difference to the static experts (the edge answers are the same)
    difference = 100 * (report["selected"]["acc"] - report["baselines"]["static_experts"]["acc"])
    assert sum(found["points_of_system_accuracy"].values()) == pytest.approx(difference)

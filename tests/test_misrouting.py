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
    assert misrouting.crossover(progressive, static) == pytest.approx(0.1)
    assert misrouting.crossover([0.1] * len(rates), [0.5] * len(rates)) is None

"""experiments/routing_search.py: every gate x top-k x fusion on a finished run, chosen on validation only."""

from __future__ import annotations

import pytest
from conftest import REPO, load_script


@pytest.fixture(scope="module")
def search():
    return load_script(REPO / "experiments" / "routing_search.py")


def test_every_routing_of_a_run_is_scored_on_validation_and_test(search, tiny_pipeline_run, monkeypatch):
    import json

    _, out = tiny_pipeline_run
    assert len(search.GATES) * len(search.TOP_K) * len(search.FUSIONS) == 27
    # two of the 27 (each costs a temperature fit and a sweep): the run's own and one other
    monkeypatch.setattr(search, "GATES", ("max_prob",))
    monkeypatch.setattr(search, "TOP_K", (1, 3))
    monkeypatch.setattr(search, "FUSIONS", ("expert",))
    default, options = search.evaluate_cell(out)
    assert set(options) == {"max_prob/top1/expert", "max_prob/top3/expert"} and default["name"] in options
    report = json.loads((out / "report.json").read_text())
    # the run's own routing, evaluated again from its cached logits, gives the report's figures
    assert options[default["name"]]["test_acc"] == pytest.approx(report["selected"]["acc"])
    assert options[default["name"]]["static_acc"] == pytest.approx(report["baselines"]["static_experts"]["acc"])
    for figures in options.values():
        assert 0.0 <= figures["calib_acc"] <= 1.0 and 0.0 <= figures["test_acc"] <= 1.0


def test_the_best_routing_is_chosen_by_validation_not_by_test(search):
    def options(calib_a, test_a, calib_b, test_b):
        base = {"offload_ratio": 0.5, "routing_acc": 0.9, "static_acc": 0.4}
        return {
            "a": {**base, "calib_acc": calib_a, "test_acc": test_a},
            "b": {**base, "calib_acc": calib_b, "test_acc": test_b},
        }

    # b is better on test in both seeds, a on validation on average: a is chosen
    runs = [({"partition.method": "superclass"}, 0, "a", options(0.50, 0.40, 0.45, 0.60))]
    runs += [({"partition.method": "superclass"}, 1, "a", options(0.52, 0.42, 0.50, 0.62))]
    summary = search.summarise(runs)
    entry = next(iter(summary.values()))
    assert entry["best_on_validation"]["routing"] == "a" and entry["seeds"] == [0, 1]
    assert entry["default"]["test_acc"][0] == pytest.approx(0.41)
    assert entry["best_on_validation"]["vs_static_points"][0] == pytest.approx(1.0)
    table = search.markdown(summary)
    assert (
        "| partition.method=superclass | a | best on validation | 51.00 ± 1.41 | 41.00 ± 1.41 | +1.00 ± 1.41 |" in table
    )

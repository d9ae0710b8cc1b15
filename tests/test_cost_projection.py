"""experiments/cost_projection.py: the evidence runs' offload shares priced with other models' costs."""

from __future__ import annotations

import pytest
from conftest import REPO, load_script


@pytest.fixture(scope="module")
def projection():
    return load_script(REPO / "experiments" / "cost_projection.py")


def test_model_sets_name_the_shipped_configs_models(projection):
    assert projection.stage_models(projection.EVIDENCE, projection.EVIDENCE) == {
        "generalist": "vit_micro_patch8_32",
        "base": "vit_mini_patch8_32",
        "experts": "vit_mini_patch8_32",
    }
    mixed = projection.stage_models(projection.EVIDENCE, projection.FULL)
    assert mixed["generalist"] == "vit_micro_patch8_32" and mixed["base"] == "vit_medium_patch4_32"


def test_offload_shares_average_progressive_runs_over_seeds(projection, tmp_path):
    results = tmp_path / "results.csv"
    header = "partition.method,specialization,seed,expert,offload_ratio,constrained_offload_ratio"
    rows = [
        "superclass,progressive,0,progressive_0,1.0,0.2",
        "superclass,progressive,0,progressive_1,1.0,0.2",  # a second expert of the same run: counted once
        "superclass,progressive,1,progressive_0,0.5,0.3",
        "superclass,static,0,static_0,0.1,0.1",  # static cells are left out
    ]
    results.write_text("\n".join([header, *rows]) + "\n")
    shares = projection.offload_shares(results)
    assert shares == {"superclass partition": {"most accurate": 0.75, "under budget": 0.25, "seeds": 2}}


def test_claims_and_break_even_follow_the_cost_model(projection):
    costs = {
        "edge_ms": 1.0,
        "offload_ms": 8.0,
        "edge_execution_ms": 3.0,
        "edge_mj": 5.0,
        "offload_mj": 20.0,
        "full_offload_mj": 25.0,
    }
    assert projection.break_even(costs) == pytest.approx(0.25)  # 1 + 0.25 * 8 = 3 ms
    at_break_even = projection.claims_at(0.25, costs)
    assert at_break_even["latency_vs_edge_execution"] == pytest.approx(0.0)
    assert at_break_even["energy_vs_full_offload"] == pytest.approx(-60.0)  # 10 mJ against 25
    assert projection.claims_at(1.0, costs)["latency_vs_edge_execution"] == pytest.approx(200.0)
    assert projection.break_even({**costs, "edge_execution_ms": 0.5}) == 0.0  # the generalist alone is slower


def test_priced_pieces_grow_with_the_models(projection):
    small = projection.price(projection.stage_models(projection.EVIDENCE, projection.EVIDENCE), projection.PROFILES[0])
    large = projection.price(projection.stage_models(projection.EVIDENCE, projection.FULL), projection.PROFILES[0])
    assert small["edge_ms"] == large["edge_ms"]  # the same generalist
    assert large["edge_execution_ms"] > 10 * small["edge_execution_ms"]
    assert large["offload_ms"] > small["offload_ms"]

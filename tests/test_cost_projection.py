"""experiments/cost_projection.py: the evidence runs' offload shares priced with other models' costs."""

from __future__ import annotations

import json

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
    assert shares == {"partition.method=superclass": {"most accurate": 0.75, "under budget": 0.25, "seeds": 2}}
    results.write_text("partition.method,seed,offload_ratio\nsuperclass,0,1.0\n")
    with pytest.raises(SystemExit, match="no column constrained_offload_ratio"):
        projection.offload_shares(results)


def test_trained_models_come_from_a_finished_runs_report_and_must_reproduce_its_baselines(projection, tmp_path):
    models = {"generalist": "vit_micro_patch8_32", "base": "vit_mini_patch8_32", "experts": "vit_mini_patch8_32"}
    cell = tmp_path / "cells" / "a" / "seed0"
    cell.mkdir(parents=True)
    costs = {
        name: {"model_name": models["experts" if name in ("progressive", "static") else name]}
        for name in ("generalist", "base", "progressive", "static")
    }
    (cell / "report.json").write_text(json.dumps({"costs": {"models": costs, "profile": {"name": "pi4_wifi_orin"}}}))
    assert projection.trained_models(tmp_path) == (models, "pi4_wifi_orin")
    with pytest.raises(SystemExit, match="no finished run"):
        projection.trained_models(tmp_path / "elsewhere")
    priced = projection.price(models, projection.PROFILES[0])
    rows = [{"models": "as trained", "profile": "pi4_wifi_orin", "costs": priced}]
    results = tmp_path / "results.csv"
    for base_ms, fails in ((priced["edge_execution_ms"], False), (2 * priced["edge_execution_ms"], True)):
        results.write_text(
            f"seed,edge_medium_latency_ms,full_offload_energy_mj\n0,{base_ms},{priced['full_offload_mj']}\n"
        )
        if fails:  # the runs were priced by another cost model or profile: refuse to project
            with pytest.raises(SystemExit, match="changed since the runs"):
                projection.check_reproduces(rows, results, "pi4_wifi_orin")
        else:
            projection.check_reproduces(rows, results, "pi4_wifi_orin")


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

"""The paper's claims measured in a run: the second (budgeted) operating point, the ablation rows that carry
the static comparison, and the claims table `ablate` writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from askexpert.ablation import claims, results
from askexpert.collab.sweep import choose_threshold


@pytest.fixture(scope="module")
def constrained_report(tiny_pipeline_run, tmp_path_factory):
    """`evaluate` of the session run with a second operating point under an offload budget of 30 %."""
    _, out = tiny_pipeline_run
    target = tmp_path_factory.mktemp("constrained")
    args = ["evaluate", "--run", str(out), "--out", str(target), "--routing.constrained.offload_ratio", "0.3"]
    from askexpert.cli import cli_main

    cli_main(args)
    return json.loads((target / "report.json").read_text()), (target / "report.md").read_text()


def test_constrained_point_is_chosen_on_validation_within_its_budget(constrained_report, tiny_pipeline_run):
    report, markdown = constrained_report
    original = json.loads((tiny_pipeline_run[1] / "report.json").read_text())
    point = report["constrained"]
    # the selected point is untouched by the second one
    assert report["selected"] == original["selected"] and report["routing"]["constrained"] == {"offload_ratio": 0.3}
    assert point["budget"] == {"offload_ratio": 0.3} and point["chosen_on"] == "val"
    # a budget can only lower the threshold (the selected point is the most accurate one without limits)
    assert point["threshold"] <= report["selected"]["threshold"]
    assert 0.0 <= point["offload_ratio"] <= 1.0 and 0.0 <= point["acc"] <= 1.0
    # the static experts answer exactly the images the system offloads at that threshold
    assert point["static_experts"]["offload_ratio"] == point["offload_ratio"]
    assert point["static_experts"]["latency_ms"] == pytest.approx(point["latency_ms"])
    assert "**askexpert under budget** (offload <= 30 %)" in markdown
    assert "under the budget (offload <= 30 %)" in markdown


def test_the_budgeted_choice_is_the_sweeps_best_within_the_limit():
    table = {
        "threshold": torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=torch.float64),
        "offload_ratio": torch.tensor([0.0, 0.2, 0.5, 0.9], dtype=torch.float64),
        "acc": torch.tensor([0.4, 0.5, 0.6, 0.55], dtype=torch.float64),
        "latency_ms": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
        "energy_mj": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
    }
    assert choose_threshold(table, {"offload_ratio": 0.3}) == 1
    assert choose_threshold(table, {}) == 2


def test_ablation_rows_carry_the_static_twin_and_the_budgeted_point(constrained_report):
    report, _ = constrained_report
    rows = results.report_rows(report, {"partition.method": "superclass"}, seed=0)
    assert len(rows) == len(report["experts"]) == len(report["static_experts"])
    for row, expert, static in zip(rows, report["experts"], report["static_experts"], strict=True):
        assert expert["classes"] == static["classes"]
        assert row["static_subset_test_acc"] == static["subset_test_acc"]
        assert row["constrained_system_acc"] == report["constrained"]["acc"]
        assert row["constrained_static_acc"] == report["constrained"]["static_experts"]["acc"]
        assert row["constrained_budget"] == "offload <= 30 %"
        assert row["base_acc"] == report["baselines"]["full_offload"]["acc"]
        # accuracy on the classes it does not own, from its overall and own-class accuracy
        n, own = report["data"]["test_size"], expert["subset_test_images"]
        right_elsewhere = expert["test_acc"] * n - expert["subset_test_acc"] * own
        assert row["other_test_acc"] == pytest.approx(right_elsewhere / (n - own))
        assert 0.0 <= row["static_other_test_acc"] <= 1.0
    assert set(results.header(["partition.method"])) >= set(rows[0])


def _rows(seed: int, system: float, static: float, own: tuple, static_own: tuple, method="superclass") -> list[dict]:
    shared = {
        "partition.method": method, "seed": str(seed), "system_acc": str(system), "static_system_acc": str(static),
        "latency_ms": "2.0", "edge_medium_latency_ms": "4.0", "energy_mj": "6.0", "full_offload_energy_mj": "10.0",
        "offload_ratio": "0.5", "routing_acc": "0.8", "edge_only_acc": "0.3",
    }  # fmt: skip
    return [
        {**shared, "expert": f"progressive_{i}", "subset_test_acc": str(a), "static_subset_test_acc": str(b)}
        for i, (a, b) in enumerate(zip(own, static_own, strict=True))
    ]


def test_claims_are_paired_per_seed_then_mean_and_std_over_seeds():
    rows = _rows(0, 0.50, 0.48, (0.6, 0.7), (0.55, 0.65)) + _rows(1, 0.52, 0.49, (0.6, 0.8), (0.6, 0.7))
    rows += _rows(0, 0.4, 0.4, (0.5, 0.5), (0.5, 0.5), method="confusion")  # another setting: its own column
    seeds = claims.per_seed(rows[:4], claims.CLAIMS[0])
    assert seeds == pytest.approx({"0": 5.0, "1": 5.0})  # experts minus static on own classes, points
    overall = claims.per_seed(rows[:4], claims.CLAIMS[1])
    assert overall == pytest.approx({"0": 2.0, "1": 3.0})
    table = claims.markdown(rows, ["partition.method"])
    lines = table.splitlines()
    assert lines[0] == "| claim | unit | paper | partition.method=superclass | partition.method=confusion |"
    subsets = next(line for line in lines if line.startswith("| experts vs static experts, own classes"))
    assert "+4.12" in subsets and "+5.00 ± 0.00 (yes) [2]" in subsets and "+0.00 (one seed: no spread) [1]" in subsets
    system = next(line for line in lines if line.startswith("| system vs static-expert system"))
    assert f"+2.50 ± {math.sqrt(0.5):.2f} (yes) [2]" in system
    latency = next(line for line in lines if line.startswith("| latency vs edge execution"))
    assert "-50.00 ± 0.00 (yes) [2]" in latency and "-45.00" in latency
    energy = next(line for line in lines if line.startswith("| edge energy vs full offload"))
    assert "-40.00 ± 0.00 (yes) [2]" in energy
    assert not any(line.startswith("| under budget") for line in lines)  # no run had a second point
    assert "*system vs static-expert system*: system accuracy minus" in table


def test_settings_without_a_static_comparison_get_no_claims_column():
    rows = _rows(0, 0.5, 0.4, (0.6,), (0.5,))
    for row in rows:  # as a `specialization: static` run: its "static baseline" is itself, no twin beside it
        row["static_subset_test_acc"] = ""
    assert claims.markdown(rows, ["partition.method"]) is None
    assert claims.verdict(1.0, 2.0, 4.12) == "unclear (within 1 std)"
    assert claims.verdict(-3.0, 1.0, 4.12) == "no, the opposite"
    assert claims.verdict(0.0, 0.0, 4.12) == "unclear (within 1 std)"  # no difference at all is not "the opposite"
    assert claims.verdict(2.0, None, 4.12) == "one seed: no spread"


def test_break_even_offloads_follow_the_cost_models_arithmetic():
    # edge only 1 ms / 5 mJ; at 50 % offload 4 ms / 15 mJ: one offloaded image adds 6 ms and 20 mJ
    row = {
        "seed": "0", "offload_ratio": "0.5", "latency_ms": "4.0", "edge_only_latency_ms": "1.0",
        "edge_medium_latency_ms": "4.0", "energy_mj": "15.0", "edge_only_energy_mj": "5.0",
        "full_offload_energy_mj": "25.0",
    }  # fmt: skip
    by_label = {claim.label: claim for claim in claims.CLAIMS}
    # as fast as edge execution (4 ms) up to (4 - 1) / 6 = 50 % offloaded
    assert by_label["latency: break-even offload"].value(row) == pytest.approx(50.0)
    # 46 % below full offload is 13.5 mJ: (13.5 - 5) / 20 = 42.5 % offloaded at most
    assert by_label["energy: offload for the paper's -46 %"].value(row) == pytest.approx(42.5)
    assert by_label["latency: break-even offload"].value({**row, "offload_ratio": "0"}) is None


def test_a_cells_minutes_count_what_it_trained_in_any_invocation():
    record = {
        "generalist": {"done": True, "seconds": 100.0},  # trained here
        "base": {"done": True},  # linked from another cell's store entry: not this cell's time
        "experts/progressive/0": {"done": True, "seconds": 50.0, "resumed": True},
    }
    found = results.cell_minutes(record, evaluation_seconds=10.0)
    assert found["trained_seconds"] == {"generalist": 100.0, "experts/progressive/0": 50.0}
    assert found["seconds"] == 160.0 and found["evaluation_seconds"] == 10.0 and found["resumed"] is True


def test_an_unset_constrained_point_leaves_a_cells_identity_as_it_was():
    """Cells finished before `routing.constrained` existed must stay done: unset, it is not in the identity."""
    from askexpert.commands.ablate import _routing_identity

    before = {"gate": "max_prob", "threshold": None, "top_k": 3, "budget": {"offload_ratio": None}, "seed": 0}
    unset = {**before, "constrained": {"offload_ratio": None, "latency_ms": None, "energy_mj": None}}
    assert _routing_identity(unset) == before
    chosen = {**before, "constrained": {"offload_ratio": 0.25, "latency_ms": None, "energy_mj": None}}
    assert _routing_identity(chosen) == chosen


def test_second_expert_rows_from_evaluate_on_a_trained_run(tiny_pipeline_run, tmp_path):
    """`evaluate --routing.second_expert.enabled true` on the session run: both points, their report rows and
    the ablation's columns (the one-expert figures unchanged by it)."""
    from askexpert.cli import cli_main

    _, out = tiny_pipeline_run
    args = ["evaluate", "--run", str(out), "--out", str(tmp_path), "--routing.constrained.offload_ratio", "0.3"]
    cli_main([*args, "--routing.second_expert.enabled", "true", "--routing.second_expert.fusion", "expert"])
    report = json.loads((tmp_path / "report.json").read_text())
    original = json.loads((out / "report.json").read_text())
    assert report["selected"] == original["selected"]
    pair, constrained = report["second_expert"], report["constrained"]["second_expert"]
    assert pair["fusion"] == constrained["fusion"] == "expert" and pair["chosen_on"] == "val"
    assert constrained["second_ratio"] <= constrained["offload_ratio"] and 0 <= pair["margin"] <= 1
    assert report["routing"]["second_expert"] == {"enabled": True, "margin": None, "fusion": "expert"}
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("**askexpert + second expert**") == 2 and "second expert under offload <= 30 %" in markdown
    row = results.report_rows(report, {"partition.method": "superclass"}, seed=0)[0]
    assert row["second_system_acc"] == pair["acc"] and row["second_ratio"] == pair["second_ratio"]
    assert row["constrained_second_system_acc"] == constrained["acc"]
    assert row["constrained_second_margin"] == constrained["margin"]
    assert set(results.header(["partition.method"], [row])) >= set(row)
    # a run evaluated without it has empty columns, not zeros, and results.csv keeps its old columns
    plain = results.report_rows(original, {"partition.method": "superclass"}, seed=0)[0]
    assert "second_system_acc" not in results.header(["partition.method"], [plain])
    assert not any(key.startswith(("second_", "constrained_second_")) for key in plain)

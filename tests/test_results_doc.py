"""experiments/results_doc.py fills docs/results.md's generated blocks from the ablations' results.csv."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

from askexpert.ablation import results

BASELINES = {"edge_only_acc": 0.1, "edge_medium_latency_ms": 10.0, "full_offload_energy_mj": 20.0}


def strategy_rows() -> list[dict]:
    rows = []
    for seed, (ours, static) in enumerate([(0.30, 0.25), (0.32, 0.29)]):
        for name, acc in (("progressive", ours), ("static", static)):
            for expert in range(2):
                rows.append(
                    {
                        "specialization": name, "experts.init": "base", "seed": seed, "expert": f"{name}_{expert}",
                        "subset_test_acc": acc + 0.1, "generalist_subset_test_acc": 0.1, "system_acc": acc,
                        "offload_ratio": 0.5, "latency_ms": 5.0, "energy_mj": 30.0, "routing_acc": 0.6, **BASELINES,
                    }
                )  # fmt: skip
    return rows


def test_blocks_are_filled_and_claims_computed(tmp_path):
    runs = tmp_path / "runs"
    grids = {"strategies": ["specialization", "experts.init"], "partitions": ["partition.method"]}
    grids["experts_topk"] = ["partition.num_experts", "routing.top_k"]
    for name, columns in grids.items():
        (runs / name).mkdir(parents=True)
        if name == "strategies":
            rows = strategy_rows()
        else:
            rows = [{**{c: "x" for c in columns}, "seed": 0, "expert": "e", "subset_test_acc": 0.5, "system_acc": 0.2}]
        (runs / name / "results.csv").write_text(results.csv_text(rows, results.header(columns)))
        (runs / name / "results.png").write_bytes(b"png")
    doc = tmp_path / "docs" / "results.md"
    (doc.parent / "results").mkdir(parents=True)
    blocks = ["strategies", "partitions", "experts_topk", "claims"]
    doc.write_text(
        "intro\n" + "".join(f"<!-- generated:{b} -->\nold\n<!-- /generated:{b} -->\nprose\n" for b in blocks)
    )
    script = [sys.executable, str(REPO / "experiments" / "results_doc.py"), "--runs", str(runs), "--doc", str(doc)]
    subprocess.run(script, check=True, capture_output=True)
    text = doc.read_text()
    assert "old" not in text and text.count("prose") == 4 and text.startswith("intro")
    assert "| progressive | base | 2 | 41.00 ± 1.41 |" in text  # own-class accuracy 0.40 and 0.42
    # system accuracy vs static: +5 and +3 points -> +4.00 ± 1.41; latency 5 vs 10 ms -> -50 %
    assert "| system accuracy vs the same system with static experts | +2.76 points | +4.00 ± 1.41 points" in text
    assert "| latency vs running the base model on the edge | -45.00 % | -50.00 ± 0.00 % (2 seeds) | yes |" in text
    assert "| edge energy vs offloading every image | -46.00 % | +50.00 ± 0.00 % (2 seeds) | no, the opposite |" in text
    assert (doc.parent / "results" / "partitions_stand_in.png").read_bytes() == b"png"


def evidence_rows() -> list[dict]:
    rows = []
    for seed in (0, 1):
        for method in ("superclass", "confusion"):
            for spec in ("progressive", "static"):
                for expert in range(2):
                    row = {
                        "partition.method": method, "specialization": spec, "seed": seed,
                        "expert": f"{spec}_{expert}", "subset_test_acc": 0.6 + 0.01 * seed,
                        "generalist_subset_test_acc": 0.4, "system_acc": 0.5 + 0.01 * seed, "offload_ratio": 0.3,
                        "latency_ms": 3.0, "energy_mj": 12.0, "routing_acc": 0.9, "edge_only_acc": 0.4,
                        "base_acc": 0.5 - 0.01 * seed, "edge_medium_latency_ms": 6.0, "full_offload_energy_mj": 24.0,
                    }  # fmt: skip
                    if spec == "progressive":  # only runs with static experts beside their own carry claims
                        row.update(static_subset_test_acc=0.58, static_system_acc=0.49)
                    rows.append(row)
    return rows


def test_evidence_blocks_minutes_and_the_readme_headline(tmp_path):
    evidence = tmp_path / "evidence"
    columns = ["partition.method", "specialization"]
    evidence.mkdir()
    (evidence / "results.csv").write_text(results.csv_text(evidence_rows(), results.header(columns)))
    (evidence / "results.png").write_bytes(b"png")
    whole = {"generalist": 120.0, "base": 900.0, **{f"experts/progressive/{i}": 90.0 for i in range(2)}}
    for seed in (0, 1):
        for cell, seconds, trained in (("a", 1300.0, whole), ("b", 200.0, {"experts/progressive/0": 90.0})):
            folder = evidence / "cells" / cell / f"seed{seed}"
            folder.mkdir(parents=True)
            record = {"seed": seed, "rows": [{}], "seconds": seconds, "trained_seconds": trained}
            (folder / "cell.json").write_text(json.dumps(record))
    doc = tmp_path / "docs" / "results.md"
    (doc.parent / "results").mkdir(parents=True)
    blocks = ["evidence_claims", "evidence_table", "evidence_models", "evidence_minutes"]
    doc.write_text("".join(f"<!-- generated:{b} -->\nSTALE\n<!-- /generated:{b} -->\n" for b in blocks))
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- generated:evidence_headline -->\nSTALE\n<!-- /generated:evidence_headline -->\nend\n")
    script = [sys.executable, str(REPO / "experiments" / "results_doc.py"), "--doc", str(doc)]
    script += ["--evidence", str(evidence), "--runs", str(tmp_path / "none"), "--readme", str(readme)]
    done = subprocess.run(script, check=True, capture_output=True, text=True)
    assert "evidence" in done.stdout
    text = doc.read_text()
    assert "STALE" not in text
    # experts vs static on own classes: 0.60 - 0.58 and 0.61 - 0.58 -> +2.50 ± 0.71 points over 2 seeds
    assert "| experts vs static experts, own classes | points | +4.12 | +2.50 ± 0.71 (yes) [2] |" in text
    assert "| latency vs edge execution | % | -45.00 | -50.00 ± 0.00 (yes) [2] |" in text
    # minutes: both cells of a seed; the whole pipeline run is cell a (generalist + base + experts)
    assert "| 0 | 2 | 25.0 | 21.7 | 2.0 | 15.0 | 3.0 (2 x 1.5) |" in text
    assert "| 1 | 40.00 | 49.00 | +9.00 |" in text  # generalist 40 %, base 49 % on seed 1
    assert (doc.parent / "results" / "evidence_stand_in.csv").read_text().startswith("partition.method,")
    headline = readme.read_text()
    assert headline.startswith("top\n") and headline.endswith("end\n") and "+2.50 ± 0.71 (yes) [2]" in headline
    assert "| generalist |" in text and "| generalist |" not in headline  # the README's table is the short one


def test_bad_inputs_give_one_line_and_change_no_file(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("<!-- generated:evidence_claims -->\nKEEP\n<!-- /generated:evidence_claims -->\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- generated:evidence_headline -->\nKEEP\n<!-- /generated:evidence_headline -->\n")
    not_ablation = tmp_path / "not_ablation"
    not_ablation.mkdir()
    (not_ablation / "results.csv").write_text("a,b\n1,2\n")
    complete = tmp_path / "complete"  # a real evidence grid, but the doc lacks most of its blocks
    complete.mkdir()
    (complete / "results.csv").write_text(
        results.csv_text(evidence_rows(), results.header(["partition.method", "specialization"]))
    )
    script = [sys.executable, str(REPO / "experiments" / "results_doc.py"), "--doc", str(doc), "--readme", str(readme)]
    script += ["--runs", str(tmp_path / "none")]
    for extra, message in (
        (["--evidence", str(tmp_path / "missing")], "no results.csv there"),
        (["--evidence", str(not_ablation)], "not the results.csv of such an ablation: no column seed"),
        (["--tuning", str(not_ablation)], "no column seed"),
        (["--scale", str(tmp_path / "missing.json")], "no such file there"),
        (["--scale", str(tmp_path)], "no such file there"),  # a folder
        (["--scale", str(not_ablation / "results.csv")], "is not benchmarks/evidence_scale.py's output"),
        (["--tables", str(not_ablation)], "none of evidence_routing.md"),
        (["--evidence", str(complete)], "has no block <!-- generated:evidence_table -->"),
    ):
        done = subprocess.run(script + extra, capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" not in done.stderr, extra
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "KEEP" in doc.read_text() and "KEEP" in readme.read_text()  # neither file half-written
        assert not (tmp_path / "results").exists()  # nor any result file copied beside the doc


def test_the_readme_demo_figures_are_the_generated_files():
    """The README's demo headline and export figures are docs/results/<block>_stand_in.md, never a hand copy."""
    readme = (REPO / "README.md").read_text()
    for name in ("demo_headline", "demo_export"):
        block = readme.split(f"<!-- generated:{name} -->\n", 1)[1].split(f"<!-- /generated:{name} -->", 1)[0]
        assert block.strip() == (REPO / "docs" / "results" / f"{name}_stand_in.md").read_text().strip()


def test_demo_export_summarises_a_manifest(tiny_export, tmp_path):
    export, manifest = tiny_export
    out = tmp_path / "export.md"
    script = [sys.executable, str(REPO / "experiments" / "demo_export.py"), "--export", str(export), "--out", str(out)]
    subprocess.run(script, check=True, capture_output=True, cwd=REPO)
    text = out.read_text()
    flips = manifest["verification"]["routing"]["routing_flips"]
    assert f"{flips} routing decisions changed" in text and "int8:" in text


def test_demo_headline_writes_what_the_pipeline_prints(tiny_pipeline_run, tmp_path):
    from askexpert.collab.report import headline_table

    _, run = tiny_pipeline_run
    out = tmp_path / "headline.md"
    script = [sys.executable, str(REPO / "experiments" / "demo_headline.py"), "--run", str(run), "--out", str(out)]
    subprocess.run(script, check=True, capture_output=True, cwd=REPO)
    text = out.read_text()
    report = json.loads((run / "report.json").read_text())
    assert headline_table(report) in text and "STAND-IN synthetic data, not CIFAR-100" in text
    assert f"Threshold τ = {report['selected']['threshold']:.2f}" in text

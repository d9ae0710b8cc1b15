"""The strategy-comparison script runs end to end (tiny models) and writes a labelled table."""

from __future__ import annotations

import json
import sys

from conftest import REPO, load_script


def load_strategy_table():
    return load_script(REPO / "experiments" / "strategy_table.py")


def test_strategy_table_writes_a_stand_in_table(tmp_path, monkeypatch):
    script = load_strategy_table()
    out, doc = tmp_path / "out", tmp_path / "table.md"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["strategy_table.py"])
    script.main(
        [
            "--tiny",
            "--seeds",
            "0",
            "--experts",
            "1",
            "--rows",
            "static (same init)",
            "dustbin",
            "progressive",
            "--out",
            str(out),
            "--doc",
            str(doc),
        ]
    )
    table = doc.read_text()
    assert table.startswith("# Specialization strategies on the STAND-IN (not CIFAR-100)")
    for row in ("generalist", "static (same init)", "dustbin", "progressive"):
        assert f"| {row}" in table
    assert "| static (scratch)" not in table
    results = json.loads((out / "results.json").read_text())["results"]["0"]
    for row in ("static (same init)", "dustbin", "progressive"):
        assert 0.0 <= results["rows"][row]["1"] <= 1.0 and 0.0 <= results["misrouted"][row]["1"] <= 1.0
    assert "on other experts' classes" in table
    assert not (out / "seed0" / "progressive" / "base" / "expert1" / "checkpoints").exists()

"""A store and run written by the revision before the house was rebuilt (tests/fixtures/legacy_store_41d4a0a) keep
working with today's code: the ablation reuses every stage by identity and reproduces its figures, `evaluate`
and `route` read the run, and an interrupted stage resumes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers.cli import run_main
from helpers.datasets import make_folder

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_store_41d4a0a"
CELL = Path("out/cells/specialization=progressive/seed0")
STAGES = 7  # generalist, base, partition, 2 progressive experts, 2 static experts
# Figures recomputed from the checkpoints (the logits cache was not kept). Accuracy over the fixture's 300 test
# images moves in steps of 1/300; another CPU may round one logit differently, so at most one image may differ.
ONE_IMAGE = 1 / 300 + 1e-9


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy, symlinks=True)
    monkeypatch.chdir(copy)  # its configs name each other relative to this folder
    # an ablation records its pipeline config by absolute path (the folder it was made in): name the copy's
    record = copy / "out" / "ablation.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "pipeline": str(copy / "pipeline.yaml")}))
    return copy


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def checkpoints(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.ckpt"))}


def test_an_old_store_is_reused_by_identity_and_gives_the_same_figures(legacy, capsys):
    recorded = json.loads((legacy / CELL / "stages.json").read_text())
    before, old_rows = checkpoints(legacy / "out" / "store"), rows(legacy / "out" / "results.csv")
    code, out, err = run_main(["ablate", "--config", "ablation.yaml", "--out", "out"], capsys)
    assert code == 0, err
    assert "seed 0: done, skipped" in out, out  # the cell's identity (from its stages' identities) is unchanged
    (legacy / CELL / "cell.json").unlink()  # forget the cell's result: it is planned stage by stage and evaluated
    code, out, err = run_main(["ablate", "--config", "ablation.yaml", "--out", "out"], capsys)
    assert code == 0, err
    assert out.count("done, config unchanged, skipped") == STAGES, out  # same identities: nothing retrains
    assert checkpoints(legacy / "out" / "store") == before
    stages = json.loads((legacy / CELL / "stages.json").read_text())
    assert {k: v["identity"] for k, v in stages.items()} == {k: v["identity"] for k, v in recorded.items()}
    new_rows = rows(legacy / "out" / "results.csv")
    assert [r.keys() for r in new_rows] == [r.keys() for r in old_rows]
    for old, new in zip(old_rows, new_rows, strict=True):
        assert (old["expert"], old["specialization"], old["seed"]) == (
            new["expert"],
            new["specialization"],
            new["seed"],
        )
        for key in ("system_acc", "static_system_acc", "subset_test_acc", "static_subset_test_acc", "base_acc"):
            assert float(new[key]) == pytest.approx(float(old[key]), abs=ONE_IMAGE), key


def test_an_old_run_evaluates_and_routes(legacy, tmp_path, capsys):
    old = json.loads((legacy / CELL / "report.json").read_text())
    code, _, err = run_main(["evaluate", "--run", str(CELL), "--out", str(tmp_path / "report")], capsys)
    assert code == 0, err
    new = json.loads((tmp_path / "report" / "report.json").read_text())
    assert new["selected"]["threshold"] == pytest.approx(old["selected"]["threshold"], rel=1e-4)
    for key in ("acc", "offload_ratio"):
        assert new["selected"][key] == pytest.approx(old["selected"][key], abs=ONE_IMAGE), key
    assert set(new["baselines"]) == set(old["baselines"])
    for name, figures in old["baselines"].items():
        assert new["baselines"][name]["acc"] == pytest.approx(figures["acc"], abs=ONE_IMAGE), name
    images = make_folder(tmp_path / "images")
    routed = tmp_path / "routes.csv"
    code, _, err = run_main(["route", "--run", str(CELL), "--images", str(images), "--out", str(routed)], capsys)
    assert code == 0, err
    assert len(rows(routed)) == 8  # every image of the folder (make_folder: 8 images and a text file)


def test_an_interrupted_stage_of_an_old_store_resumes_from_its_last_checkpoint(legacy, capsys):
    store = legacy / "out" / "store"
    next(store.glob("base-*.done")).unlink()  # as if the base model's training had been interrupted
    (legacy / CELL / "cell.json").unlink()  # and the cell had no result yet
    code, out, err = run_main(["ablate", "--config", "ablation.yaml", "--out", "out"], capsys)
    assert code == 0, err
    assert "base: resuming from its last checkpoint" in out, out
    assert out.count("done, config unchanged, skipped") == STAGES - 1, out  # the experts still match its identity
    assert next(store.glob("base-*.done")).is_file()

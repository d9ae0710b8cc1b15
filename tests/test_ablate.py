"""`ablate`: grid expansion, one shared generalist per seed, resume, results files and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers.cli import assert_clean_failure, run_main
from helpers.pipelines import write_configs

from askexpert.ablation import grid as grids
from askexpert.ablation import results
from askexpert.errors import UserError

GRID = {"specialization": ["static", "progressive"], "routing.top_k": [1, 3]}


def write_ablation(folder: Path, grid: dict, seeds=(0, 1), **extra) -> Path:
    spec = {"pipeline": str(write_configs(folder)), "seeds": list(seeds), "fixed": {"static_baseline": False}}
    path = folder / "ablation.yaml"
    path.write_text(yaml.safe_dump({**spec, "grid": grid, **extra}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny ablation (2 strategies x 2 top_k x 2 seeds, 2 experts each), shared read-only."""
    from askexpert.cli import cli_main

    folder = tmp_path_factory.mktemp("ablation")
    config = write_ablation(folder, GRID)
    out = folder / "out"
    records = cli_main(["ablate", "--config", str(config), "--out", str(out)])
    return config, out, records


# -- the grid ----------------------------------------------------------------------------------------------
def test_grid_expands_to_every_combination_in_key_order():
    cells = grids.expand({"specialization": ["full", "static"], "experts.overrides.model.init_args.init": ["a", "b"]})
    assert [c.columns() for c in cells] == [
        {"specialization": "full", "experts.init": "a"},
        {"specialization": "full", "experts.init": "b"},
        {"specialization": "static", "experts.init": "a"},
        {"specialization": "static", "experts.init": "b"},
    ]
    assert cells[1].name == "specialization=full_experts.init=b"
    assert len({c.name for c in grids.expand({"routing.top_k": [1, 2, 3], "partition.num_experts": [2, 4]})}) == 6


def test_cell_arguments_split_pipeline_options_from_stage_overrides():
    args, overrides = grids.cell_arguments(
        {"routing.top_k": 2, "partition.method": "random", "experts.overrides.trainer.max_epochs": 3}
    )
    assert args == ["--routing.top_k=2", "--partition.method=random"]
    assert overrides == {"experts": {"trainer.max_epochs": 3}}


@pytest.mark.parametrize(
    "grid, fragments",
    [
        ({"routing.topk": [1]}, ["unknown grid key 'routing.topk'", "routing.top_k", "overrides"]),
        ({"seed": [1, 2]}, ["set by the ablation itself"]),
        ({"specialization": []}, ["non-empty list"]),
        ({"routing.top_k": [1, 1]}, ["lists a value twice"]),
        ({"models.overrides.trainer.max_epochs": [1]}, ["unknown grid key"]),
    ],
)
def test_bad_grids_are_refused_with_the_valid_keys(grid, fragments):
    with pytest.raises(UserError) as found:
        grids.expand(grid)
    for fragment in fragments:
        assert fragment in str(found.value)


# -- running -------------------------------------------------------------------------------------------------
def test_shared_stages_one_generalist_and_base_per_seed(finished):
    _, out, records = finished
    store = out / "store"
    assert len(records) == 8  # 4 cells x 2 seeds
    assert len([p for p in store.glob("generalist-*") if p.is_dir()]) == 2  # one per seed, not one per cell
    assert len([p for p in store.glob("base-*") if p.is_dir()]) == 2
    assert len(list(store.glob("partition-*.json"))) == 1  # the seeds share the superclass partition
    assert len([p for p in store.glob("experts-*") if p.is_dir()]) == 2 * 2 * 2  # strategy x expert x seed
    cells = out / "cells"
    seed0 = [
        cells / name / "seed0"
        for name in ("specialization=static_routing.top_k=1", "specialization=static_routing.top_k=3")
    ]
    # cells that differ only in routing link to the very same experts (trained once)
    targets = {(cell / "experts" / "static" / "0").resolve() for cell in seed0}
    assert len(targets) == 1 and next(iter(targets)).parent == store.resolve()
    assert (seed0[0] / "generalist").resolve() == (
        cells / "specialization=progressive_routing.top_k=1" / "seed0" / "generalist"
    ).resolve()


def test_results_csv_has_one_row_per_cell_seed_and_expert(finished):
    _, out, _ = finished
    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = reader.fieldnames
    assert header[:9] == [
        "specialization", "routing.top_k", "seed", "expert",
        "subset_test_acc", "system_acc", "offload_ratio", "latency_ms", "energy_mj",
    ]  # fmt: skip
    assert len(rows) == 4 * 2 * 2
    assert {(r["specialization"], r["routing.top_k"], r["seed"]) for r in rows} == {
        (s, k, seed) for s in ("static", "progressive") for k in ("1", "3") for seed in ("0", "1")
    }
    assert {r["expert"] for r in rows if r["specialization"] == "static"} == {"static_0", "static_1"}
    for row in rows:
        for key in ("subset_test_acc", "system_acc", "offload_ratio"):
            assert 0.0 <= float(row[key]) <= 1.0  # fractions, not percent
        assert float(row["latency_ms"]) > 0 and float(row["energy_mj"]) > 0
    # the values are the cell reports' own
    report = json.loads(
        (out / "cells" / "specialization=progressive_routing.top_k=3" / "seed1" / "report.json").read_text()
    )
    row = next(
        r for r in rows if r["specialization"] == "progressive" and r["routing.top_k"] == "3" and r["seed"] == "1"
    )
    assert float(row["system_acc"]) == pytest.approx(report["selected"]["acc"], abs=1e-5)
    assert float(row["subset_test_acc"]) == pytest.approx(report["experts"][0]["subset_test_acc"], abs=1e-5)
    text = (out / "results.md").read_text()
    assert "STAND-IN" in text and text.count("\n| ") == 1 + 4  # header + one line per setting
    assert (out / "results.png").stat().st_size > 1000


def test_each_cell_records_config_seed_versions_and_revision(finished):
    _, out, _ = finished
    record = json.loads((out / "cells" / "specialization=static_routing.top_k=1" / "seed1" / "cell.json").read_text())
    assert record["seed"] == 1 and record["cell"] == {"specialization": "static", "routing.top_k": "1"}
    assert set(record["provenance"]["packages"]) >= {"torch", "lightning", "timm", "askexpert"}
    assert record["provenance"]["git_revision"]
    assert "seed: 1" in record["settings"] and "top_k: 1" in record["settings"]
    assert record["stages"]["generalist"]["config"]["seed_everything"] == 1


def test_a_second_run_skips_every_finished_cell(finished, tmp_path, capsys):
    config, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    checkpoints = {p: p.stat().st_mtime_ns for p in (copy / "store").rglob("best.ckpt")}
    (copy / "cells" / "specialization=progressive_routing.top_k=1" / "seed0" / "cell.json").unlink()
    code, stdout, err = run_main(["ablate", "--config", str(config), "--out", str(copy)], capsys)
    assert code == 0, err
    assert stdout.count(": done, skipped") == 7  # the one without its result is evaluated again ...
    assert "running (" not in stdout.replace("seed 0: running (", "")  # ... and trains nothing
    assert {p: p.stat().st_mtime_ns for p in (copy / "store").rglob("best.ckpt")} == checkpoints
    assert (copy / "results.csv").read_text() == (out / "results.csv").read_text()


def test_an_interrupted_shared_stage_resumes_in_the_store(finished, tmp_path, capsys):
    config, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    generalist = (copy / "cells" / "specialization=static_routing.top_k=1" / "seed1" / "generalist").resolve()
    (generalist.parent / f"{generalist.name}.done").unlink()  # as if the process died while it trained
    for record in (copy / "cells").glob("*/seed1/cell.json"):
        record.unlink()
    code, stdout, err = run_main(["ablate", "--config", str(config), "--out", str(copy)], capsys)
    assert code == 0, err
    assert stdout.count("generalist: resuming from its last checkpoint") == 1  # once, by the first seed-1 cell
    assert stdout.count(": done, skipped") == 4  # the seed-0 cells
    assert (generalist.parent / f"{generalist.name}.done").is_file()
    assert (copy / "results.csv").read_text() == (out / "results.csv").read_text()


def test_a_second_ablate_on_the_same_store_is_refused_while_the_first_runs(tmp_path):
    from helpers.locks import hold

    from askexpert.ablation.store import StageStore

    holder = hold(tmp_path / "store")  # another process (the first ablate) holds the store
    try:
        with pytest.raises(UserError, match=f"store is in use by pid {holder.pid}"):
            with StageStore(str(tmp_path / "store")).locked():
                pass
    finally:
        holder.kill()
        holder.wait()
    with StageStore(str(tmp_path / "store")).locked():  # released when the first is gone
        pass


@pytest.mark.slow  # ~15 s; bit-identical reruns are also checked by tests/test_run_safety.py in the default run
def test_rerunning_a_cell_from_scratch_reproduces_its_metrics(finished, tmp_path):
    from askexpert.cli import cli_main

    _, out, records = finished
    config = write_ablation(tmp_path, {"specialization": ["progressive"], "routing.top_k": [3]}, seeds=[1])
    again = cli_main(["ablate", "--config", str(config), "--out", str(tmp_path / "again")])
    before = next(
        r for r in records if r["cell"] == {"specialization": "progressive", "routing.top_k": "3"} and r["seed"] == 1
    )
    for old, new in zip(before["rows"], again[0]["rows"], strict=True):
        for key in results.METRICS:
            assert new[key] == pytest.approx(old[key], abs=1e-4), key


def test_out_with_a_different_grid_is_refused_then_replaced_with_overwrite(finished, tmp_path, capsys):
    config, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    spec = yaml.safe_load(config.read_text())
    spec["grid"] = {"specialization": ["static"], "routing.top_k": [1]}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, _, err = run_main(["ablate", "--config", str(changed), "--out", str(copy)], capsys)
    assert code == 2 and "different ablation (grid differ)" in err and "--overwrite" in err
    store = {p.name for p in (copy / "store").iterdir()}
    code, stdout, err = run_main(
        ["ablate", "--config", str(changed), "--out", str(copy), "--overwrite", "true"], capsys
    )
    assert code == 0, err
    assert {p.name for p in (copy / "store").iterdir()} >= store  # trained stages are kept for reuse
    assert stdout.count(": done, skipped") == 2  # both seeds' cell was already finished
    assert [p.name for p in (copy / "cells").iterdir()] == ["specialization=static_routing.top_k=1"]
    assert len((copy / "results.csv").read_text().splitlines()) == 1 + 2 * 2


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"grid": {"specialization": ["bogus"]}}, ["cell specialization=bogus (seed 0)", "progressive"]),
        ({"grid": {"partition.method": ["clusters"]}}, ["unknown partition method 'clusters'", "superclass"]),
        ({"grid": {"routing.gate": ["vote"]}}, ["vote", "max_prob"]),
        ({"grid": {"experts.overrides.model.init_args.init": ["imagenet"]}}, ["experts", "imagenet"]),
        ({"grid": {"routing.top_k": "3"}}, ["list"]),
        ({"seeds": []}, ["at least one seed"]),
        ({"fixed": {"bogus_key": 1}}, ["unknown fixed key 'bogus_key'"]),
        ({"fixed": {"specialization": "static"}}, ["both fixed and in the grid"]),
        ({"pipeline": "missing.yaml"}, ["pipeline config not found: missing.yaml"]),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, capsys, change, fragments):
    config = write_ablation(tmp_path, GRID)
    spec = {**yaml.safe_load(config.read_text()), **change}
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    code, _, err = run_main(["ablate", "--config", str(config), "--out", str(out)], capsys)
    assert_clean_failure(code, err, out, *fragments)


def test_out_that_is_not_an_ablation_is_refused(tmp_path, capsys):
    config = write_ablation(tmp_path, GRID)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(["ablate", "--config", str(config), "--out", str(out)], capsys)
    assert code == 2 and "not an ablation" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    config = write_ablation(tmp_path, GRID)
    out = tmp_path / "out"
    code, stdout, err = run_main(["ablate", "--config", str(config), "--out", str(out), "--dry_run", "true"], capsys)
    assert code == 0, err
    assert (
        "4 cells x 2 seeds = 8 runs, sharing 13 distinct stages (2 generalist, 2 base, 1 partition, 8 experts)"
        in stdout
    )
    assert not out.exists()


# -- aggregation -----------------------------------------------------------------------------------------------
def test_mean_and_std_over_seeds_on_a_hand_made_csv(tmp_path):
    path = tmp_path / "results.csv"
    columns = results.header(["specialization"])
    rows = [
        # seed 0: experts 0.2 and 0.4 (mean 0.3); seed 1: 0.5 and 0.7 (mean 0.6); system acc 0.1 / 0.3
        {"specialization": "static", "seed": 0, "expert": "static_0", "subset_test_acc": 0.2, "system_acc": 0.1},
        {"specialization": "static", "seed": 0, "expert": "static_1", "subset_test_acc": 0.4, "system_acc": 0.1},
        {"specialization": "static", "seed": 1, "expert": "static_0", "subset_test_acc": 0.5, "system_acc": 0.3},
        {"specialization": "static", "seed": 1, "expert": "static_1", "subset_test_acc": 0.7, "system_acc": 0.3},
        {"specialization": "full", "seed": 0, "expert": "full_0", "subset_test_acc": 0.9, "system_acc": 0.5},
    ]
    path.write_text(results.csv_text(rows, columns))
    _, read = results.read_csv(str(path))
    table = {e["specialization"]: e for e in results.aggregate(read, ["specialization"])}
    mean, std = table["static"]["subset_test_acc"]
    assert mean == pytest.approx(0.45) and std == pytest.approx(0.212132, abs=1e-6)  # sample std of 0.3, 0.6
    assert table["static"]["system_acc"] == pytest.approx((0.2, 0.141421), abs=1e-6)
    assert table["static"]["seeds"] == 2
    assert table["full"]["system_acc"] == (pytest.approx(0.5), None)  # one seed: no std
    markdown = results.markdown_table(list(table.values()), ["specialization"])
    assert "| static | 2 | 45.00 ± 21.21 |" in markdown
    assert "| full | 1 | 90.00 |" in markdown


# -- the shipped ablations ----------------------------------------------------------------------------------------
SHIPPED = sorted((Path(__file__).resolve().parent.parent / "configs" / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_ablations_name_valid_keys_and_files(path):
    from askexpert.commands.ablate import parser

    args = parser().parse_args(["--config", str(path), "--out", "unused"])
    assert (REPO / args.pipeline).is_file()
    # a tuning grid compares a few settings on the validation figures of one seed; a result grid has 3 seeds
    tuning = "_tuning" in path.stem
    assert len(grids.expand(args.grid)) >= (2 if tuning else 3) and len(args.seeds) == (1 if tuning else 3)
    grids.check_keys(list(args.fixed), "fixed")


def test_topk_cells_share_every_stage_of_their_expert_count(tmp_path, capsys, monkeypatch):
    """The shipped experts_topk grid plans 9 cells x 3 seeds but trains only 3 runs' worth per seed."""
    monkeypatch.chdir(REPO)
    args = ["ablate", "--config", "configs/ablations/experts_topk.yaml", "--seeds", "[0]", "--dry_run", "true"]
    code, stdout, err = run_main([*args, "--out", str(tmp_path / "out"), "--store", str(tmp_path / "s")], capsys)
    assert code == 0, err
    # one generalist, one base, 3 partitions (2, 4, 10 experts), 2 + 4 + 10 experts: 21 stages for 9 cells
    assert "9 cells x 1 seeds = 9 runs, sharing 21 distinct stages" in stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_values_that_are_not_plain_names_get_distinct_folders():
    cells = grids.expand({"experts.config": [["a/b.yaml"], ["a-b.yaml"]]})
    assert len({c.name for c in cells}) == 2 and all("/" not in c.name for c in cells)


# slow (~19 s): a whole extra ablation; divergence inside a pipeline stays in the default run
# (test_pipeline_stages.py::test_a_diverging_stage_stops_the_pipeline_and_a_new_config_retrains_it)
@pytest.mark.slow
def test_a_diverged_cell_is_recorded_and_the_others_go_on(tmp_path, capsys):
    grid = {"base.overrides.model.init_args.lr": [1e30, 1e-3], "routing.top_k": [1, 2]}
    config = write_ablation(tmp_path, grid, seeds=[0])
    out = tmp_path / "out"
    code, stdout, err = run_main(["ablate", "--config", str(config), "--out", str(out)], capsys)
    # the grid is not whole: exit status 3 (as for one diverged run), one line naming the diverged runs
    last = err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("askexpert: error: 2 of 4 runs diverged (") and "Traceback" not in err, err
    assert "routing.top_k=1 seed 0; " in last and "the others finished" in last
    assert stdout.count("DIVERGED at stage base, step ") == 1  # trained once...
    assert stdout.count("shares stage base, which diverged") == 1  # ...and its other cell is not retrained
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["base.lr"] for row in rows} == {"0.001"} and len(rows) == 2 * 2  # 2 cells x 2 experts
    markdown = (out / "results.md").read_text()
    assert "2 of 4 runs finished, 2 diverged" in markdown and "## Diverged runs" in markdown
    assert markdown.count("| base | ") == 2
    cell = json.loads(next((out / "cells").glob("base.lr=1e+30_routing.top_k=1/seed0/cell.json")).read_text())
    assert cell["diverged"]["stage"] == "base" and cell["rows"] == []
    # a rerun tries the diverged cells again (they are not done) and skips the finished ones
    code, stdout, _ = run_main(["ablate", "--config", str(config), "--out", str(out), "--dry_run", "true"], capsys)
    assert code == 0 and stdout.count("diverged before: to run again") == 2 and stdout.count(": done") == 2


def _plan_shipped(path: Path, seeds: list[int] | None = None, store: Path | None = None):
    """Plan a shipped ablation as `ablate --dry_run` does (nothing written); real datasets swapped for the
    stand-in, since they are not on this machine."""
    from askexpert.commands.ablate import parser, plan

    args = parser().parse_args(["--config", str(path), "--out", str(store / "out"), "--dry_run", "true"])
    args.store = str(store / "store")
    if seeds is not None:
        args.seeds = seeds
    pipeline = yaml.safe_load((REPO / args.pipeline).read_text())
    if pipeline["data"]["source"] != "synthetic":
        args.fixed = {**args.fixed, "data.source": "synthetic", "data.root": None}
    return plan(args)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem != "evidence"], ids=lambda p: p.stem)
def test_every_shipped_ablation_plans_on_cpu(path, tmp_path, monkeypatch, capsys):
    """`ablate --dry_run` of every shipped grid (one seed, GPU configs included): every cell resolves."""
    monkeypatch.chdir(REPO)
    _, runs, store = _plan_shipped(path, seeds=[0], store=tmp_path)
    assert len(runs) == len(grids.expand(yaml.safe_load(path.read_text())["grid"]))
    assert all(run.identity for run in runs) and not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def _distinct(runs) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for planned in runs:
        for stage in planned.prepared.stages:
            found.setdefault(stage.name.split("/")[0], set()).add(stage.identity)
    return found


def test_evidence_grid_trains_one_generalist_and_base_per_seed(tmp_path, monkeypatch):
    """Across its cells the evidence grid trains each seed's generalist and base model once, the static experts
    once per seed and partition (the static cells and the budget point train nothing of their own)."""
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / "ablations" / "evidence.yaml"  # (planned with all its seeds: also its dry run)
    spec = yaml.safe_load(path.read_text())
    _, runs, _ = _plan_shipped(path, store=tmp_path)
    seeds, methods = spec["seeds"], spec["grid"]["partition.method"]
    assert seeds == [0, 1, 2] and len(runs) == len(seeds) * len(grids.expand(spec["grid"]))
    stages = _distinct(runs)
    assert len(stages["generalist"]) == len(seeds) and len(stages["base"]) == len(seeds)
    num_experts = yaml.safe_load((REPO / spec["pipeline"]).read_text())["partition"]["num_experts"]
    # progressive and static experts per seed and partition: nothing more, whatever the other grid keys
    assert len(stages["experts"]) == len(seeds) * len(methods) * 2 * num_experts
    by_seed = {}
    for planned in runs:
        found = {s.name: s.identity for s in planned.prepared.stages}
        by_seed.setdefault(planned.seed, set()).add((found["generalist"], found["base"]))
    assert all(len(pairs) == 1 for pairs in by_seed.values())  # every cell of a seed links the same two


def test_evidence_tuning_shares_seed_0s_stages_with_the_evidence_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    folder = REPO / "configs" / "ablations"
    _, evidence, _ = _plan_shipped(folder / "evidence.yaml", seeds=[0], store=tmp_path / "a")
    _, tuning, _ = _plan_shipped(folder / "evidence_tuning.yaml", store=tmp_path / "b")
    _, steps, _ = _plan_shipped(folder / "evidence_tuning_steps.yaml", store=tmp_path / "c")
    assert {p.seed for p in tuning + steps} == {0}
    for kind in ("generalist", "base"):
        assert _distinct(tuning)[kind] == _distinct(steps)[kind] == _distinct(evidence)[kind]
    # the schedules were compared at 2 epochs: the steps grid's 2-epoch experts are the tuning grid's default cell
    assert len(_distinct(tuning)["experts"] & _distinct(steps)["experts"]) == 8
    # and its 4-epoch cell (the chosen steps) is the evidence grid's superclass cell: all 8 experts trained once
    assert len(_distinct(steps)["experts"] & _distinct(evidence)["experts"]) == 8

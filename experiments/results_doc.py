"""Fill the generated blocks of docs/results.md (and the README's headline) from the ablations' results.

    make evidence ablations            # runs (or, when finished, just re-reads) the ablations
    python experiments/results_doc.py  # rewrites the blocks between <!-- generated:NAME --> markers

Three families of blocks, each refilled when its results exist (the others are left as they are):
- the accuracy/minutes candidates behind the evidence pipeline (benchmarks/evidence_scale.py's JSON, `--scale`)
  the tables of the analysis scripts (`--tables`: experiments/routing_search.py's routing alternatives chosen on
  validation, experiments/misrouting.py's progressive-vs-static crossover, experiments/cost_projection.py's
  latency and energy with other models' costs) and the tuning grids' validation
  figures (`--tuning`);
- the evidence at CPU scale (`configs/ablations/evidence.yaml`, `--evidence`): the claims table
  (`askexpert.ablation.claims`, the same table `ablate` writes), the per-setting table, the models and the
  minutes per seed from each cell's `cell.json`; its results.csv and results.png are copied to
  docs/results/evidence_stand_in.*, and the claims table also goes into README.md's headline block;
- the three demo ablations (`--runs`): their tables, and the research claims from the strategies grid, where
  static experts are a cell of their own (paired per seed across cells).
The prose around the blocks is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.ablation import claims as claim_table  # noqa: E402
from askexpert.ablation import results  # noqa: E402

ABLATIONS = ("strategies", "partitions", "experts_topk")
PAPER = claim_table.PAPER
EVIDENCE = "evidence"
# block name -> the script that writes docs/results/<name>.md from the evidence runs
INCLUDED = {
    "evidence_routing": "experiments/routing_search.py",
    "evidence_misrouting": "experiments/misrouting.py",
    "evidence_costs": "experiments/cost_projection.py",
    "evidence_second_expert": "experiments/second_expert.py",
    "evidence_adapt": "experiments/adapt_evidence.py",
}


def load(folder: Path, required: tuple[str, ...] = ()) -> tuple[list[str], list[dict]]:
    """An ablation's (grid columns, rows); one clear line when the file is not an ablation's results.csv."""
    path = folder / "results.csv"
    try:
        header, rows = results.read_csv(str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"cannot read {path}: {err}") from None
    missing = [c for c in ("seed", *required) if c not in header]
    if missing:
        raise SystemExit(f"{path} is not the results.csv of such an ablation: no column {', '.join(missing)}")
    columns = header[: header.index("seed")]
    return columns, rows


def table(columns: list[str], rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows}, key=int)
    counts = defaultdict(set)
    for row in rows:
        counts[tuple(row[c] for c in columns)].add(row["seed"])
    note = f"Seeds {', '.join(seeds)}; {len(counts)} settings; mean ± sample std over seeds."
    return note + "\n\n" + results.markdown_table(results.aggregate(rows, columns), columns)


def per_seed(rows: list[dict], key: str, **match) -> dict[str, float]:
    """A metric per seed for the rows matching `match` (per-expert metrics averaged over the seed's experts)."""
    found = defaultdict(list)
    for row in rows:
        if all(row[k] == v for k, v in match.items()) and row[key] not in ("", None, "nan"):
            found[row["seed"]].append(float(row[key]))
    return {seed: statistics.fmean(values) for seed, values in found.items()}


def paired(a: dict[str, float], b: dict[str, float], relative: bool = False) -> tuple[float, float | None, int]:
    seeds = sorted(set(a) & set(b), key=int)
    diffs = [100 * (a[s] / b[s] - 1) if relative else 100 * (a[s] - b[s]) for s in seeds]
    mean, std = results.mean_std(diffs)
    return mean, std, len(seeds)


def claims(rows: list[dict]) -> str:
    """The demo strategies grid's claims: static experts are a cell of their own, paired with ours by seed."""
    ours = {"specialization": "progressive", "experts.init": "base"}
    static = {"specialization": "static", "experts.init": "base"}
    lines = [
        "| paper's claim | paper | stand-in (progressive experts, init base) | same direction |",
        "|---|---:|---:|---|",
    ]

    def add(text: str, paper: float, value: tuple, unit: str) -> None:
        mean, std, n = value
        shown = f"{mean:+.2f}" + ("" if std is None else f" ± {std:.2f}") + f" {unit} ({n} seeds)"
        verdict = claim_table.verdict(mean, std, paper).replace("unclear (within 1 std)", "no clear difference")
        if verdict == "no clear difference":
            verdict += " (mean within 1 std)"
        lines.append(f"| {text} | {paper:+.2f} {unit} | {shown} | {verdict} |")

    add(
        "experts on their own classes vs the generalist",
        PAPER["subsets"],
        paired(per_seed(rows, "subset_test_acc", **ours), per_seed(rows, "generalist_subset_test_acc", **ours)),
        "points",
    )
    add(
        "experts on their own classes vs static experts (same init)",
        PAPER["subsets"],
        paired(per_seed(rows, "subset_test_acc", **ours), per_seed(rows, "subset_test_acc", **static)),
        "points",
    )
    add(
        "system accuracy vs the same system with static experts",
        PAPER["overall"],
        paired(per_seed(rows, "system_acc", **ours), per_seed(rows, "system_acc", **static)),
        "points",
    )
    add(
        "latency vs running the base model on the edge",
        PAPER["latency"],
        paired(per_seed(rows, "latency_ms", **ours), per_seed(rows, "edge_medium_latency_ms", **ours), True),
        "%",
    )
    add(
        "edge energy vs offloading every image",
        PAPER["energy"],
        paired(per_seed(rows, "energy_mj", **ours), per_seed(rows, "full_offload_energy_mj", **ours), True),
        "%",
    )
    offload = results.mean_std(list(per_seed(rows, "offload_ratio", **ours).values()))
    edge = results.mean_std(list(per_seed(rows, "edge_only_acc", **ours).values()))
    routing = results.mean_std(list(per_seed(rows, "routing_acc", **ours).values()))
    lines += [
        "",
        f"At the selected operating points the system offloads {100 * offload[0]:.1f} % of the test images "
        f"(± {100 * (offload[1] or 0):.1f} over seeds); the generalist alone is right on {100 * edge[0]:.2f} % of "
        f"all test images, and {100 * routing[0]:.1f} % of the offloaded images reach an expert that owns their "
        "class (means over seeds).",
    ]
    return "\n".join(lines)


# -- the evidence at CPU scale --------------------------------------------------------------------------------
def cell_records(folder: Path) -> list[dict]:
    """Every finished cell's cell.json of an ablation folder (diverged ones have no rows)."""
    found = []
    for path in sorted((folder / "cells").glob("*/seed*/cell.json")):
        record = json.loads(path.read_text())
        if record.get("rows"):
            found.append(record)
    return found


def minutes(records: list[dict]) -> str:
    """Minutes per seed: everything its cells trained and evaluated, and the one cell that trained a whole
    pipeline run (generalist, base, every expert)."""
    by_seed: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        by_seed[int(record["seed"])].append(record)
    lines = [
        "| seed | cells | minutes, all cells | one whole pipeline run: minutes | generalist | base | experts (each) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, cells in sorted(by_seed.items()):
        if any("seconds" not in c for c in cells):
            lines.append(f"| {seed} | {len(cells)} | (cells of an older version: no times) | | | | |")
            continue
        whole = next((c for c in cells if {"generalist", "base"} <= set(c.get("trained_seconds", {}))), None)
        total = sum(c["seconds"] for c in cells) / 60
        if whole is None:  # its generalist and base were trained by another grid sharing the store (tuning)
            lines.append(f"| {seed} | {len(cells)} | {total:.1f} (stages another grid trained not counted) | – | | | |")
            continue
        trained = whole["trained_seconds"]
        experts = [v for k, v in trained.items() if k.startswith("experts/")]
        resumed = " (a stage resumed: minutes before its interruption missing)" if whole.get("resumed") else ""
        each = f" ({len(experts)} x {statistics.fmean(experts) / 60:.1f})" if experts else ""
        lines.append(
            f"| {seed} | {len(cells)} | {total:.1f} | {whole['seconds'] / 60:.1f}{resumed} | "
            f"{trained['generalist'] / 60:.1f} | {trained['base'] / 60:.1f} | {sum(experts) / 60:.1f}{each} |"
        )
    return "\n".join(lines)


def models(rows: list[dict]) -> str:
    """The models every seed trained: test accuracy of the generalist and the base model, per seed."""
    by_seed: dict[str, dict] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], row)
    lines = ["| seed | generalist (edge only) % | base model % | base - generalist, points |", "|---:|---:|---:|---:|"]
    for seed, row in sorted(by_seed.items(), key=lambda item: int(item[0])):
        generalist, base = float(row["edge_only_acc"]), float(row["base_acc"])
        lines.append(f"| {seed} | {100 * generalist:.2f} | {100 * base:.2f} | {100 * (base - generalist):+.2f} |")
    return "\n".join(lines)


def scale_table(path: Path) -> str:
    """The accuracy/minutes candidates behind the evidence pipeline (benchmarks/evidence_scale.py's JSON)."""
    try:
        found = json.loads(path.read_text())["results"]
        if not isinstance(found, dict):
            raise TypeError("'results' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path} is not benchmarks/evidence_scale.py's output ({type(err).__name__}: {err})") from None
    lines = [
        "| candidate | parameters | epochs | best val acc % | val acc % by epoch | minutes | min / epoch | timed by |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, entry in found.items():
        curve = " ".join(f"{100 * a:.0f}" for a in entry["val_acc"])
        shared = ", machine shared" if entry.get("shared_machine") else ""
        lines.append(
            f"| {name} | {entry['params'] / 1e6:.2f} M | {entry['epochs']} | {100 * entry['best_val_acc']:.1f} | "
            f"{curve} | {entry['wall_s'] / 60:.1f} | {entry['minutes_per_epoch']:.2f} | {entry['timed_by']}{shared} |"
        )
    return "\n".join(lines)


def tuning_table(folders: list[Path]) -> str:
    """The tuning grids' validation figures only (the split that chose τ): what chose the evidence settings."""
    lines = [
        "| grid | setting | seeds | system acc on the split that chose τ % | static-expert system there % | "
        "difference, points |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for folder in folders:
        columns, rows = load(folder, ("calib_system_acc",))
        for entry in results.aggregate(rows, columns):
            setting = ", ".join(f"{c}={entry[c]}" for c in columns)
            match = {c: entry[c] for c in columns}
            ours = per_seed(rows, "calib_system_acc", **match)
            static = per_seed(rows, "calib_static_system_acc", **match)
            if not ours:
                continue
            mean_ours = statistics.fmean(ours.values())
            if static:
                mean_static = statistics.fmean(static.values())
                versus = f"{100 * mean_static:.2f} | {100 * (mean_ours - mean_static):+.2f}"
            else:  # a grid without static experts beside its own
                versus = "– | –"
            lines.append(f"| {folder.name} | {setting} | {len(ours)} | {100 * mean_ours:.2f} | {versus} |")
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str, where: str = "docs/results.md") -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where} has no block <!-- generated:{name} -->")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def fill_evidence(text: str, folder: Path, copies: list) -> tuple[str, str]:
    """The evidence blocks of docs/results.md, and the short claims table (for the README)."""
    columns, rows = load(folder, ("edge_only_acc", "base_acc", "system_acc", "offload_ratio"))
    none = "No setting of this grid has a static-expert comparison."
    claims_md = claim_table.markdown(rows, columns) or none
    headline = claim_table.markdown(rows, columns, only=claim_table.HEADLINE) or none
    if (folder / "results.png").is_file():  # ablate writes it when matplotlib can draw
        copies.append((folder / "results.png", f"{EVIDENCE}_stand_in.png"))
    copies.append((folder / "results.csv", f"{EVIDENCE}_stand_in.csv"))
    text = replace_block(text, "evidence_claims", claims_md)
    text = replace_block(text, "evidence_table", table(columns, rows))
    text = replace_block(text, "evidence_models", models(rows))
    records = cell_records(folder)
    if records:  # a results.csv without its cells (copied elsewhere) leaves the minutes as they were
        text = replace_block(text, "evidence_minutes", minutes(records))
    return text, headline


def _inputs(args: argparse.Namespace) -> tuple[dict[str, list[Path]], set[str]]:
    """The result files to read, and the inputs the user named. A default that does not exist yet is skipped (its
    blocks stay as they are); a path the user named must exist, and the doc must have its blocks."""
    defaults = {
        "evidence": [REPO / "runs" / "ablations" / EVIDENCE],
        "tuning": [REPO / "runs" / "ablations" / n for n in ("evidence_tuning", "evidence_tuning_steps")],
        "tables": [REPO / "docs" / "results"],
        "scale": [REPO / "benchmarks" / "results" / "evidence_scale_cpu.json"],
    }
    wanted = {"evidence": "results.csv", "tuning": "results.csv", "tables": "", "scale": ""}
    found = {}
    for name, default in defaults.items():
        given = getattr(args, name)
        paths = [Path(p) for p in ([given] if isinstance(given, str) else given)] if given else default
        if given:
            for path in paths:
                if not (path / wanted[name]).exists() or (name == "scale" and not path.is_file()):
                    raise SystemExit(f"--{name} {path}: no {wanted[name] or 'such file'} there")
                if name == "tables" and not any((path / f"{block}.md").is_file() for block in INCLUDED):
                    raise SystemExit(f"--tables {path}: none of {', '.join(f'{b}.md' for b in INCLUDED)} there")
        found[name] = [path for path in paths if (path / wanted[name]).exists()]
    return found, {name for name in defaults if getattr(args, name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "ablations"), help="folder of the three ablations")
    parser.add_argument("--evidence", help="evidence ablation (default runs/ablations/evidence)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "results.md"))
    parser.add_argument(
        "--tuning",
        nargs="+",
        help="tuning ablations, their validation columns only (default runs/ablations/evidence_tuning*)",
    )
    parser.add_argument(
        "--tables",
        help="folder of the analysis scripts' tables: evidence_routing.md, evidence_misrouting.md, evidence_costs.md, "
        "evidence_second_expert.md, evidence_adapt.md (default docs/results)",
    )
    parser.add_argument("--scale", help="model candidates (default benchmarks/results/evidence_scale_cpu.json)")
    parser.add_argument("--readme", default=str(REPO / "README.md"), help="README with the evidence_headline block")
    args = parser.parse_args()
    inputs, named = _inputs(args)

    def wanted(block: str, source: str) -> bool:  # a named input must find its block (replace_block says so)
        return source in named or f"<!-- generated:{block} -->" in text

    doc = Path(args.doc)
    try:
        text = doc.read_text()
    except OSError as err:
        raise SystemExit(f"cannot read {doc}: {err.strerror}") from None
    filled, readme_text = [], None
    copies: list[tuple[Path, str]] = []  # (result file, its name under docs/results/): committed with the doc
    for scale in inputs["scale"]:
        if wanted("evidence_scale", "scale"):
            text = replace_block(text, "evidence_scale", scale_table(scale))
            if scale.with_suffix(".png").is_file():
                copies.append((scale.with_suffix(".png"), "evidence_scale_cpu.png"))
            filled.append("evidence_scale")
    for tables in inputs["tables"]:
        for name in INCLUDED:  # tables the analysis scripts wrote under docs/results/
            table_file = tables / f"{name}.md"
            if table_file.is_file() and wanted(name, "tables"):
                text = replace_block(text, name, table_file.read_text())
                filled.append(name)
    tuning = inputs["tuning"]
    if tuning and wanted("evidence_tuning", "tuning"):
        text = replace_block(text, "evidence_tuning", tuning_table(tuning))
        for folder in tuning:  # the rows behind the table, committed with it
            copies.append((folder / "results.csv", f"{folder.name}_stand_in.csv"))
        filled.append("evidence_tuning")
    for evidence in inputs["evidence"]:
        if not wanted("evidence_claims", "evidence"):  # a doc without the evidence blocks (found by default)
            continue
        text, headline = fill_evidence(text, evidence, copies)
        readme = Path(args.readme)
        if readme.is_file() and "<!-- generated:evidence_headline -->" in readme.read_text():
            readme_text = replace_block(readme.read_text(), "evidence_headline", headline, str(readme))
        filled.append(EVIDENCE)
    readme = Path(args.readme)
    # the demo's figures: experiments/demo_headline.py and experiments/demo_export.py write them
    for block in ("demo_headline", "demo_export"):
        demo = REPO / "docs" / "results" / f"{block}_stand_in.md"
        if demo.is_file() and readme.is_file() and f"<!-- generated:{block} -->" in readme.read_text():
            base = readme_text if readme_text is not None else readme.read_text()
            readme_text = replace_block(base, block, demo.read_text(), str(readme))
            filled.append(block)
    for name in ABLATIONS:
        folder = Path(args.runs) / name
        if not (folder / "results.csv").is_file():
            continue
        columns, rows = load(folder)
        if (folder / "results.png").is_file():
            copies.append((folder / "results.png", f"{name}_stand_in.png"))
        text = replace_block(text, name, table(columns, rows))
        if name == "strategies":
            text = replace_block(text, "claims", claims(rows))
        filled.append(name)
    if not filled:
        raise SystemExit(
            f"no results found (runs/ablations/{EVIDENCE}/results.csv, "
            f"{args.runs}/<{'|'.join(ABLATIONS)}>/results.csv): run `make evidence` or `make ablations` first"
        )
    # every file only once every block is filled: a refused block changes none of them
    (doc.parent / "results").mkdir(exist_ok=True)
    for source, name in copies:
        shutil.copyfile(source, doc.parent / "results" / name)
    doc.write_text(text)
    if readme_text is not None:
        Path(args.readme).write_text(readme_text)
    print(f"wrote {doc}: {', '.join(filled)}")


if __name__ == "__main__":
    main()

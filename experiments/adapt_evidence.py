"""`adapt` at the evidence scale: does the edge generalist learn from its experts' answers? 3 seeds, with controls.

    make evidence                               # the runs (trains nothing when they are finished)
    python experiments/adapt_evidence.py        # runs every adapt below (resumable), then writes the table

For each seed's superclass/progressive evidence run, `adapt` plays 4 rounds of deployment at the run's
constrained operating point (offload <= 25 %: the near-edge answers only the images the edge is least sure of)
in four variants: the experts' answers with replay (the defaults), and the replay-only control (`--replay 1`:
the same steps on the generalist's own training data, the answers never learnt), each with 5 000 and 20 000 stream
images a round. Per round and variant: mean ± std over seeds of the system's test accuracy and offload at the
deployed point, at the equal-accuracy point (the least offload whose validation accuracy reaches round 0's), and
the generalist alone. Writes OUT.json, OUT.md and OUT.png (default docs/results/evidence_adapt.*), which
results_doc.py puts into docs/results.md. Every adapt folder goes under --runs (default
runs/ablations/evidence_adapt), one per (variant, seed).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.ablation.results import mean_std  # noqa: E402
from experiments.finished_runs import write_tables  # noqa: E402

CELL = "partition.method=superclass_specialization=progressive"
ROUNDS = 4
# name -> (what it is, adapt's extra arguments)
VARIANTS = {
    "experts": ("experts' answers + replay 0.5, 5 000 a round", []),
    "replay_only": ("replay only (control), 5 000 a round", ["--replay", "1"]),
    "experts_20k": ("experts' answers + replay 0.5, 20 000 a round", ["--stream_size", str(ROUNDS * 20_000)]),
    "replay_only_20k": (
        "replay only (control), 20 000 a round",
        ["--replay", "1", "--stream_size", str(ROUNDS * 20_000)],
    ),
}
COLUMNS = ("acc", "offload_ratio", "eq_acc", "eq_offload_ratio", "generalist_acc", "kept_label_acc", "val_acc")


def run_all(evidence: Path, runs: Path, seeds: list[int]) -> dict[str, dict[int, list[dict]]]:
    """Every (variant, seed) adapted (finished rounds are skipped by adapt itself) and its adapt.csv rows."""
    found: dict[str, dict[int, list[dict]]] = {name: {} for name in VARIANTS}
    for seed in seeds:
        run = evidence / "cells" / CELL / f"seed{seed}"
        if not (run / "report.json").is_file():
            raise SystemExit(f"{run} is not a finished evidence run: run `make evidence` first")
        for name, (_, extra) in VARIANTS.items():
            out = runs / name / f"seed{seed}"
            command = [sys.executable, "-m", "askexpert", "adapt", "--run", str(run), "--rounds", str(ROUNDS)]
            command += ["--point", "constrained", "--seed", str(seed), "--out", str(out), *extra]
            print("$", " ".join(command[1:]), flush=True)
            if subprocess.run(command, cwd=REPO).returncode != 0:
                raise SystemExit(f"adapt failed for {name} seed {seed} (its output is above)")
            with open(out / "adapt.csv", newline="", encoding="utf-8") as handle:
                found[name][seed] = list(csv.DictReader(handle))
    return found


def shown(values: list[float], scale: float = 100) -> str:
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def summarise(found: dict[str, dict[int, list[dict]]]) -> tuple[dict, str]:
    data: dict = {}
    lines = [
        "| variant | round | deployed point: acc % | offload % | equal accuracy: acc % | offload % | generalist % "
        "| kept answers right % | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_seed in found.items():
        label = VARIANTS[name][0]
        data[name] = {}
        for r in range(ROUNDS + 1):
            rows = [rows[r] for rows in per_seed.values() if len(rows) > r]
            values = {key: [float(row[key]) for row in rows if row.get(key) not in ("", None)] for key in COLUMNS}
            data[name][r] = values
            kept = shown(values["kept_label_acc"]) if values["kept_label_acc"] else "–"
            lines.append(
                f"| {label} | {r} | {shown(values['acc'])} | {shown(values['offload_ratio'])} "
                f"| {shown(values['eq_acc'])} | {shown(values['eq_offload_ratio'])} "
                f"| {shown(values['generalist_acc'])} | {kept} | {len(rows)} |"
            )
    note = (
        "STAND-IN data (not CIFAR-100), the evidence runs (superclass partition, progressive experts) at their "
        "constrained point (offload <= 25 %, chosen on validation again every round); mean ± sample std over seeds. "
        "*Equal accuracy*: the τ that offloads least while its validation accuracy reaches round 0's. *Kept answers "
        "right*: how often the top class of the answers the generalist learnt from is the true one (measured, never "
        "used)."
    )
    return data, note + "\n\n" + "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rounds in data.items():
        xs = sorted(rounds)
        for axis, key in ((axes[0], "eq_offload_ratio"), (axes[1], "generalist_acc")):
            means = [100 * mean_std(rounds[r][key])[0] for r in xs]
            axis.plot(xs, means, marker="o", label=VARIANTS[name][0])
    axes[0].set_ylabel("offload at equal accuracy (%)")
    axes[1].set_ylabel("generalist alone, test accuracy (%)")
    for axis in axes:
        axis.set_xticks(range(ROUNDS + 1))
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.suptitle("adapt at the evidence scale, mean of seeds - STAND-IN data, not CIFAR-100")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evidence", default=str(REPO / "runs" / "ablations" / "evidence"), help="evidence ablation")
    parser.add_argument("--runs", default=str(REPO / "runs" / "ablations" / "evidence_adapt"), help="adapt folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "evidence_adapt"), help="OUT.json/.md/.png")
    args = parser.parse_args()
    found = run_all(Path(args.evidence), Path(args.runs), args.seeds)
    data, markdown = summarise(found)
    write_tables(args.out, data, markdown)
    plot(data, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()

"""The second expert against the one-expert system, paired per seed, from the second-expert ablation's results.

    python -m askexpert ablate --config configs/ablations/evidence_second_expert.yaml \
        --out runs/ablations/evidence_second_expert                 # evaluation only, after `make evidence`
    python experiments/second_expert.py --ablation runs/ablations/evidence_second_expert

Every run's report holds both systems, each chosen on validation under the same limits (none: the most
accurate point; and the constrained offload budget), so each difference is paired inside one run (same models,
router and test images). Writes OUT.json and OUT.md (default docs/results/evidence_second_expert.*), which
results_doc.py puts into docs/results.md.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.ablation.results import mean_std, read_csv  # noqa: E402
from experiments.finished_runs import arguments, write_tables  # noqa: E402

SETTINGS = ("partition.method", "routing.second_expert.fusion")
# (prefix of the point's columns in results.csv, how the table names it)
POINTS = (("", "most accurate"), ("constrained_", "under budget"))


def per_seed(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """setting -> seed -> one row (the system columns are the same on every expert's row of a run)."""
    found: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row.get("second_system_acc", "") != "":
            found[tuple(row[key] for key in SETTINGS)].setdefault(row["seed"], row)
    return found


def shown(values: list[float], scale: float = 100, digits: int = 2, sign: bool = False) -> str:
    mean, std = mean_std([scale * v for v in values])
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + ("" if std is None else f" ± {std:.{digits}f}")


def summarise(found: dict[tuple, dict[str, dict]]) -> tuple[list[dict], str]:
    lines = [
        "| partition | fusion | point | one expert: acc % | offload % | two experts: acc % "
        "| offload % | asked of two % | margin | Δ acc (points) | Δ latency % | Δ system energy % "
        "| routing acc % one → two | seeds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    data = []
    for (partition, fusion), seeds in sorted(found.items()):
        runs = list(seeds.values())
        for prefix, label in POINTS:
            if runs[0].get(f"{prefix}second_system_acc", "") == "":
                continue

            def column(name: str, p: str = prefix, of: list[dict] = runs) -> list[float]:
                return [float(r[f"{p}{name}"]) for r in of]

            one, two = column("system_acc"), column("second_system_acc")
            gain = [b - a for a, b in zip(one, two, strict=True)]
            latency = [b / a - 1 for a, b in zip(column("latency_ms"), column("second_latency_ms"), strict=True)]
            energy_one, energy_two = column("system_energy_mj"), column("second_system_energy_mj")
            energy = shown([b / a - 1 for a, b in zip(energy_one, energy_two, strict=True)], sign=True, digits=1)
            routing_one, routing_two = column("routing_acc"), column("second_routing_acc")
            lines.append(
                f"| {partition} | {fusion} | {label} | {shown(one)} | {shown(column('offload_ratio'), digits=1)} "
                f"| {shown(two)} | {shown(column('second_offload_ratio'), digits=1)} "
                f"| {shown(column('second_ratio'), digits=1)} | {shown(column('second_margin'), 1)} "
                f"| {shown(gain, sign=True)} | {shown(latency, sign=True, digits=1)} | {energy} "
                f"| {shown(routing_one, digits=1)} → {shown(routing_two, digits=1)} | {len(runs)} |"
            )
            data.append(
                {
                    "partition": partition,
                    "fusion": fusion,
                    "point": label,
                    "one_expert_acc": one,
                    "two_expert_acc": two,
                    "gain_points": [100 * g for g in gain],
                    "asked_of_two": column("second_ratio"),
                    "margin": column("second_margin"),
                }
            )
    note = (
        "STAND-IN data (not CIFAR-100), the evidence scale, mean ± sample std over seeds; Δ = two experts minus one, "
        "paired per seed; both points of a row chosen on validation under the same limits. Routing accuracy is "
        "measured at each system's own point (for two experts: some asked expert owns the true class); system "
        "energy counts the edge device and the near-edge accelerator (both experts' compute)."
    )
    return data, note + "\n\n" + "\n".join(lines)


def main() -> None:
    args = arguments(__doc__, "evidence_second_expert")
    if args.ablation == str(REPO / "runs" / "ablations" / "evidence"):
        args.ablation = str(REPO / "runs" / "ablations" / "evidence_second_expert")
    path = Path(args.ablation) / "results.csv"
    try:
        header, rows = read_csv(str(path))
    except OSError as err:
        raise SystemExit(f"cannot read {path}: {err.strerror}") from None
    missing = [key for key in (*SETTINGS, "seed", "second_system_acc") if key not in header]
    if missing:
        raise SystemExit(f"{path} is not the second-expert ablation's results.csv: no column {', '.join(missing)}")
    found = per_seed(rows)
    if not found:
        raise SystemExit(f"{path} has no two-expert figures: were its runs evaluated with the second expert enabled?")
    data, markdown = summarise(found)
    write_tables(args.out, data, markdown)


if __name__ == "__main__":
    main()

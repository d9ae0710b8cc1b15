"""An ablation's results: one CSV row per (cell, seed, expert), then mean ± std over seeds per setting.

`results.csv` holds fractions (accuracy 0.4, not 40 %); `results.md` shows accuracies in percent.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict

from askexpert.collab.budgets import limits_text
from askexpert.files.atomic import atomic_path

# The columns the issue asks for, then context for the research claims (baselines of the same run).
METRICS = ["subset_test_acc", "system_acc", "offload_ratio", "latency_ms", "energy_mj"]
CONTEXT = [
    "generalist_subset_test_acc",
    "threshold",
    "routing_acc",
    "system_energy_mj",
    "edge_only_acc",
    "edge_medium_acc",
    "edge_medium_latency_ms",
    "full_offload_energy_mj",
    "static_system_acc",
    "oracle_acc",
    "static_subset_test_acc",
    "base_acc",
    "constrained_system_acc",
    "constrained_offload_ratio",
    "constrained_latency_ms",
    "constrained_energy_mj",
    "constrained_routing_acc",
    "constrained_static_acc",
    "constrained_budget",
    "calib_system_acc",
    "calib_static_system_acc",
    "edge_only_latency_ms",
    "edge_only_energy_mj",
    "other_test_acc",
    "static_other_test_acc",
]
# The second expert (`--routing.second_expert.enabled`): its own points, chosen under the same limits. Only in a
# results.csv whose runs evaluated it, so the CSVs of every other ablation keep their columns.
SECOND_EXPERT = [
    "second_system_acc",
    "second_offload_ratio",
    "second_ratio",
    "second_margin",
    "second_latency_ms",
    "second_energy_mj",
    "second_system_energy_mj",
    "second_routing_acc",
    "constrained_system_energy_mj",
    "constrained_second_system_acc",
    "constrained_second_offload_ratio",
    "constrained_second_ratio",
    "constrained_second_margin",
    "constrained_second_latency_ms",
    "constrained_second_energy_mj",
    "constrained_second_system_energy_mj",
    "constrained_second_routing_acc",
]
# per-setting table columns: (csv column, header, scale)
TABLE = [
    ("subset_test_acc", "expert acc on own classes %", 100),
    ("generalist_subset_test_acc", "generalist acc there %", 100),
    ("system_acc", "system acc %", 100),
    ("offload_ratio", "offload %", 100),
    ("latency_ms", "latency ms", 1),
    ("energy_mj", "edge energy mJ", 1),
    ("routing_acc", "routing acc %", 100),
    ("calib_system_acc", "system acc on the split that chose τ %", 100),
]


def header(grid_columns: list[str], rows: list[dict] | None = None) -> list[str]:
    """results.csv's columns; the second expert's only when some of `rows` has its figures."""
    paired = any(row.get("second_system_acc") not in ("", None) for row in rows or [])
    return [*grid_columns, "seed", "expert", *METRICS, *CONTEXT, *(SECOND_EXPERT if paired else [])]


def report_rows(report: dict, cell_columns: dict, seed: int) -> list[dict]:
    """One row per expert of a pipeline report (`askexpert.collab.evaluation.evaluate_run`)."""
    sel, base = report["selected"], report["baselines"]

    def get(name: str, key: str):
        return base[name][key] if name in base else ""

    point = report.get("constrained") or {}
    calib = (report.get("calibration") or {}).get("selected") or {}

    def at_point(key: str):
        value = point.get(key, "")
        return "" if value is None else value

    shared = {
        "system_acc": sel["acc"],
        "offload_ratio": sel["offload_ratio"],
        "latency_ms": sel["latency_ms"],
        "energy_mj": sel["energy_mj"],
        "threshold": sel["threshold"],
        "routing_acc": "" if sel.get("routing_acc") is None else sel["routing_acc"],
        "system_energy_mj": sel["system_energy_mj"],
        "edge_only_acc": get("edge_only", "acc"),
        "edge_medium_acc": get("edge_medium", "acc"),
        "edge_medium_latency_ms": get("edge_medium", "latency_ms"),
        "full_offload_energy_mj": get("full_offload", "energy_mj"),
        "static_system_acc": get("static_experts", "acc"),
        "oracle_acc": get("oracle_expert", "acc"),
        "base_acc": get("full_offload", "acc"),
        "constrained_system_acc": at_point("acc"),
        "constrained_offload_ratio": at_point("offload_ratio"),
        "constrained_latency_ms": at_point("latency_ms"),
        "constrained_energy_mj": at_point("energy_mj"),
        "constrained_routing_acc": at_point("routing_acc"),
        "constrained_static_acc": point["static_experts"]["acc"] if "static_experts" in point else "",
        "constrained_budget": limits_text(point["budget"]) if point else "",
        # the selected point scored on the split that chose it: what tuning compares (never test)
        "calib_system_acc": calib.get("acc", ""),
        "calib_static_system_acc": calib.get("static_experts_acc", ""),
        "edge_only_latency_ms": get("edge_only", "latency_ms"),
        "edge_only_energy_mj": get("edge_only", "energy_mj"),
    }
    if "second_expert" in report:  # only then: the CSVs of runs without it keep their columns (`header`)
        shared["constrained_system_energy_mj"] = at_point("system_energy_mj")
        shared.update(_second_expert_columns(report["second_expert"], "second_"))
        shared.update(_second_expert_columns(point.get("second_expert") or {}, "constrained_second_"))
    # static experts of the same run, by index: expert i and static expert i own the same classes
    static = {e["name"].rsplit("_", 1)[-1]: e for e in report.get("static_experts") or []}
    test_size = int(report["data"]["test_size"])
    twins = [_static_twin(static, expert) for expert in report["experts"]]
    return [
        {
            **cell_columns,
            "seed": seed,
            "expert": expert["name"],
            "subset_test_acc": expert["subset_test_acc"],
            "generalist_subset_test_acc": expert["generalist_subset_test_acc"],
            "static_subset_test_acc": twin["subset_test_acc"] if twin else "",
            "other_test_acc": other_classes_accuracy(expert, test_size),
            "static_other_test_acc": other_classes_accuracy(twin, test_size) if twin else "",
            **shared,
        }
        for expert, twin in zip(report["experts"], twins, strict=True)
    ]


def _second_expert_columns(pair: dict, prefix: str) -> dict:
    """The two-expert point's columns ("" where the run evaluated none)."""
    keys = {"system_acc": "acc", "offload_ratio": "offload_ratio", "ratio": "second_ratio", "margin": "margin"}
    keys |= {k: k for k in ("latency_ms", "energy_mj", "system_energy_mj", "routing_acc")}
    columns = {f"{prefix}{name}": pair.get(key, "") for name, key in keys.items()}
    return {name: ("" if value is None else value) for name, value in columns.items() if name in SECOND_EXPERT}


def _static_twin(static: dict[str, dict], expert: dict) -> dict | None:
    """The static expert that owns the same classes as `expert` (None when the run has none)."""
    twin = static.get(expert["name"].rsplit("_", 1)[-1])
    return twin if twin and twin["classes"] == expert["classes"] else None


def other_classes_accuracy(expert: dict, test_size: int):
    """An expert's test accuracy on the images of the classes it does not own: what it answers for an image
    routed to it by mistake ("" for an expert that owns every class, or a report without the counts)."""
    own_images = expert.get("subset_test_images")
    if own_images is None or "test_acc" not in expert or test_size <= own_images:
        return ""
    right = expert["test_acc"] * test_size - expert["subset_test_acc"] * own_images
    return right / (test_size - own_images)


def cell_minutes(record: dict, evaluation_seconds: float) -> dict:
    """What a cell cost: the stages trained in its own run folder (in this or an interrupted earlier invocation;
    stages shared from other cells carry no time), its evaluation, their sum, and whether a stage resumed (its
    time before the interruption is not known)."""
    trained = {name: entry["seconds"] for name, entry in record.items() if "seconds" in entry}
    return {
        "seconds": round(sum(trained.values()) + evaluation_seconds, 1),
        "trained_seconds": trained,
        "evaluation_seconds": round(evaluation_seconds, 1),
        "resumed": any(entry.get("resumed") for entry in record.values()),
    }


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(row.get(key, "")) for key in columns})
    return buffer.getvalue()


def _format(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_csv(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(rows: list[dict], grid_columns: list[str]) -> list[dict]:
    """Per setting (grid values): each metric's mean ± std over seeds. Per-expert metrics are first averaged
    over a seed's experts, so every seed counts once."""
    per_setting: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        seeds[tuple(row[c] for c in grid_columns)][str(row["seed"])].append(row)
    out = []
    for setting, by_seed in seeds.items():
        values = per_setting[setting]
        for seed_rows in by_seed.values():
            for key, _, _ in TABLE:
                found = [v for v in (number(r.get(key)) for r in seed_rows) if v is not None]
                if found:
                    values[key].append(statistics.fmean(found))
        entry = dict(zip(grid_columns, setting, strict=True))
        entry["seeds"] = len(by_seed)
        for key, found in values.items():
            entry[key] = mean_std(found)
        out.append(entry)
    return out


def markdown_table(aggregated: list[dict], grid_columns: list[str]) -> str:
    lines = [
        "| " + " | ".join([*grid_columns, "seeds", *(h for _, h, _ in TABLE)]) + " |",
        "|" + "---|" * (len(grid_columns) + 1 + len(TABLE)),
    ]
    for entry in aggregated:
        cells = [str(entry[c]) for c in grid_columns] + [str(entry["seeds"])]
        for key, _, scale in TABLE:
            found = entry.get(key)
            if found is None:
                cells.append("–")
                continue
            mean, std = found
            cells.append(f"{scale * mean:.2f}" + ("" if std is None else f" ± {scale * std:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(aggregated: list[dict], grid_columns: list[str], path: str, title: str) -> None:
    """Bar chart of system accuracy and the experts' own-class accuracy per setting, with ±1 std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(str(e[c]) for c in grid_columns) or "default" for e in aggregated]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.6), sharey=True)
    panels = (("system_acc", "system accuracy (%)"), ("subset_test_acc", "expert accuracy on own classes (%)"))
    for ax, (key, name) in zip(axes, panels, strict=True):
        means = [100 * e[key][0] if key in e else 0.0 for e in aggregated]
        stds = [100 * (e[key][1] or 0.0) if key in e else 0.0 for e in aggregated]
        ax.barh(range(len(labels)), means, xerr=stds, color="#4c72b0", capsize=3)
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a temporary file, fsync, rename (askexpert/files/atomic.py)
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

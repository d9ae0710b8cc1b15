"""The report's plots besides pareto.png, one function per plot, each returning a matplotlib figure (None when the
run has nothing to draw), written by `collab/report.py` next to report.md:

- `training_curves_figure`: train loss and validation accuracy per step of every stage, from its metrics.csv;
- `reliability_figure`: the generalist's reliability diagram before and after temperature scaling (the report's
  `reliability`, `collab/diagnostics.py`);
- `routing_figure`: which expert each class's offloaded test images reach, the right cells outlined (the
  report's `routing_counts`);
- `experts_figure`: each expert's accuracy on its own classes against the generalist's on the same images.
"""

from __future__ import annotations

import csv
import glob
import os

# file name -> (title in report.md)
PLOT_FILES = {
    "training_curves.png": "Training curves",
    "reliability.png": "Gate calibration (reliability diagram)",
    "routing.png": "Routing of the offloaded test images",
    "experts_vs_generalist.png": "Experts against the generalist on their own classes",
}
TRAIN_KEY, VAL_KEY, SUBSET_KEY = "train/loss", "val/acc", "val/subset_acc"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def stage_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of the train loss and the validation accuracy (an expert's on its own classes where
    logged) in one stage's metrics.csv (`loggers.RunCSVLogger`); empty lists where a column is missing."""
    found: dict[str, list[tuple[int, float]]] = {TRAIN_KEY: [], VAL_KEY: [], SUBSET_KEY: []}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, values in found.items():
                value = row.get(key)
                if value not in (None, ""):
                    values.append((int(float(step)), float(value)))
    return found


def run_stages(run_dir: str) -> dict[str, dict[str, str]]:
    """Stage kind (generalist, base, experts) -> stage label -> its metrics.csv, for the stages that have one."""
    kinds: dict[str, dict[str, str]] = {"generalist": {}, "base": {}, "experts": {}}
    for kind in ("generalist", "base"):
        path = os.path.join(run_dir, kind, "metrics.csv")
        if os.path.isfile(path):
            kinds[kind][kind] = path
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "experts", "*", "*", "metrics.csv"))):
        family, index = path.split(os.sep)[-3:-1]
        kinds["experts"][f"{family}_{index}"] = path
    return {kind: stages for kind, stages in kinds.items() if stages}


def training_curves_figure(run_dir: str):
    """Train loss (top) and validation accuracy (bottom) per step, one column per stage kind; experts coloured by
    index, one line style per family. None when no stage of `run_dir` has a metrics.csv."""
    kinds = run_stages(run_dir)
    if not kinds:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6.0), squeeze=False, sharex="col")
    styles = ["-", "--", ":", "-."]
    for column, (kind, stages) in enumerate(kinds.items()):
        families = sorted({label.rsplit("_", 1)[0] for label in stages})
        own_classes = False
        for n, (label, path) in enumerate(stages.items()):
            metrics = stage_metrics(path)
            family = label.rsplit("_", 1)[0]
            index = int(label.rsplit("_", 1)[1]) if kind == "experts" else n
            look = families.index(family)
            style = {"color": f"C{index % 10}", "linestyle": styles[look % len(styles)]}
            val = metrics[SUBSET_KEY] or metrics[VAL_KEY]
            own_classes |= bool(metrics[SUBSET_KEY])
            if metrics[TRAIN_KEY]:
                axes[0, column].plot(*zip(*metrics[TRAIN_KEY], strict=True), label=label, linewidth=1.2, **style)
            if val:
                steps, values = zip(*val, strict=True)
                marker = "os^D"[look % 4]
                axes[1, column].plot(
                    steps, [100 * v for v in values], marker=marker, markersize=4, label=label, **style
                )
        axes[0, column].set_title(kind)
        axes[0, column].set_ylabel("train loss")
        axes[1, column].set_ylabel("val accuracy, own classes (%)" if own_classes else "val accuracy (%)")
        axes[1, column].set_xlabel("step")
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
        if len(stages) > 1:
            axes[0, column].legend(fontsize=7, ncol=2 if len(stages) > 4 else 1, loc="upper right")
    figure.suptitle("training curves per stage")
    figure.tight_layout()
    return figure


def _reliability_panel(axis, counts_axis, bins: list[dict], title: str) -> None:
    width = bins[0]["hi"] - bins[0]["lo"]
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    filled = [b for b in bins if b["count"]]
    axis.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    axis.bar(
        [(b["lo"] + b["hi"]) / 2 for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        edgecolor="black",
        linewidth=0.5,
        color="tab:blue",
        label="accuracy",
    )
    axis.bar(
        [(b["lo"] + b["hi"]) / 2 for b in filled],
        [b["confidence"] - b["accuracy"] for b in filled],
        bottom=[b["accuracy"] for b in filled],
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="upper left")
    axis.grid(alpha=0.3)
    total = sum(b["count"] for b in bins) or 1
    counts_axis.bar(centers, [100 * b["count"] / total for b in bins], width=width, color="grey", edgecolor="black")
    counts_axis.set_xlim(0, 1)
    counts_axis.set_xlabel("confidence (top-1 probability)")
    counts_axis.set_ylabel("% images", fontsize=8)
    counts_axis.grid(alpha=0.3)


def reliability_figure(report: dict):
    """Reliability diagrams of the generalist before and after temperature scaling, with the ECE of each and the
    share of images per bin underneath. None when the report has no `reliability`."""
    found = report.get("reliability")
    if not found:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(
        2, 2, figsize=(10, 5.4), gridspec_kw={"height_ratios": [3, 1]}, sharex="col", squeeze=False
    )
    temperature = found["temperature"]
    _reliability_panel(
        axes[0, 0], axes[1, 0], found["bins"]["before"], f"before (T = 1): ECE {found['ece_before']:.3f}"
    )
    _reliability_panel(
        axes[0, 1], axes[1, 1], found["bins"]["after"], f"after (T = {temperature:.2f}): ECE {found['ece_after']:.3f}"
    )
    fitted = f", T fitted on {found['fitted_on']}" if found.get("fitted_on") else ", temperature scaling off"
    figure.suptitle(f"generalist calibration on {found['split']} ({found['images']} images{fitted})")
    figure.tight_layout()
    return figure


def class_order(report: dict, num_classes: int) -> tuple[list[int], list[int]]:
    """(classes sorted by their first expert, then uncovered ones; the group boundaries between experts)."""
    order, seen, bounds = [], set(), []
    for expert in report["experts"]:
        for c in expert["classes"]:
            if c not in seen:
                order.append(c)
                seen.add(c)
        bounds.append(len(order))
    return order + [c for c in range(num_classes) if c not in seen], bounds


def routing_figure(report: dict):
    """Heatmap of the offloaded test images per (expert, class), classes grouped by their expert and each class's
    right experts outlined. None without routing counts or experts."""
    found = report.get("routing_counts")
    if not found or not report["experts"]:
        return None
    import numpy as np
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    counts = np.asarray(found["counts"])  # (classes, experts)
    num_classes, num_experts = counts.shape
    order, bounds = class_order(report, num_classes)
    names = {c: n for e in report["experts"] for c, n in zip(e["classes"], e["class_names"], strict=True)}
    grid = counts[order].T  # (experts, classes in order)
    figure, axis = plt.subplots(figsize=(min(max(6.0, 0.14 * num_classes + 2.5), 18.0), 1.0 + 0.5 * num_experts + 1.2))
    image = axis.imshow(grid, aspect="auto", cmap="Blues", interpolation="nearest")
    owned = [set(expert["classes"]) for expert in report["experts"]]
    cells = [(column, e) for column, c in enumerate(order) for e in range(num_experts) if c in owned[e]]
    outlines = [Rectangle((column - 0.5, e - 0.5), 1, 1) for column, e in cells]
    axis.add_collection(PatchCollection(outlines, facecolor="none", edgecolor="tab:red", linewidth=1))
    for bound in bounds[:-1]:
        axis.axvline(bound - 0.5, color="black", linewidth=0.8)
    if num_classes * num_experts <= 200:
        for e in range(num_experts):
            for column in range(num_classes):
                if grid[e, column]:
                    axis.text(column, e, str(grid[e, column]), ha="center", va="center", fontsize=6)
    font = 8 if num_classes <= 20 else 6 if num_classes <= 50 else 4.5
    axis.set_xticks(range(num_classes), [names.get(c, str(c)) for c in order], rotation=90, fontsize=font)
    axis.set_yticks(range(num_experts), [e["name"] for e in report["experts"]], fontsize=8)
    axis.set_xlabel("true class (grouped by the expert that owns it; red: the right expert)", fontsize=8)
    right = sum(int(counts[c, e]) for e, x in enumerate(report["experts"]) for c in x["classes"])
    offloaded = found["offloaded"]
    share = f", {100 * right / offloaded:.1f} % to a right expert" if offloaded else ""
    axis.set_title(
        f"offloaded test images per class and expert (threshold {found['threshold']:.2f}: {offloaded} images{share})",
        fontsize=9,
    )
    figure.colorbar(image, ax=axis, fraction=0.03, pad=0.01).ax.tick_params(labelsize=7)
    figure.tight_layout()
    return figure


def experts_figure(report: dict):
    """Bars per expert: the generalist, the experts and the static experts (when the run has them) on the test
    images of the expert's classes. None without experts."""
    experts, static = report["experts"], report.get("static_experts") or []
    if not experts:
        return None
    plt = _pyplot()
    series = [("generalist", [e["generalist_subset_test_acc"] for e in experts], "tab:gray")]
    series.append((f"{experts[0]['strategy']} expert", [e["subset_test_acc"] for e in experts], "tab:blue"))
    if len(static) == len(experts):
        series.append(("static expert", [e["subset_test_acc"] for e in static], "tab:orange"))
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(experts) + 2.0), 4.0))
    for n, (label, values, color) in enumerate(series):
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(experts))]
        bars = axis.bar(xs, [100 * v for v in values], width=width, label=label, color=color)
        axis.bar_label(bars, labels=[f"{100 * v:.1f}" for v in values], fontsize=7, padding=1)
    axis.set_xticks(
        range(len(experts)),
        [
            f"expert {i}\n({len(e['classes'])} classes,\n{e['subset_test_images']} images)"
            for i, e in enumerate(experts)
        ],
        fontsize=8,
    )
    axis.set_ylabel("test accuracy on the expert's classes (%)")
    top = max((100 * v for _, values, _ in series for v in values if v == v), default=0.0)
    axis.set_ylim(0, min(100, 1.15 * top + 5))
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    axis.set_title("experts vs the generalist on their own classes (test)", fontsize=10)
    figure.tight_layout()
    return figure


def figures(report: dict, run_dir: str) -> dict:
    """File name -> figure of every plot this report (and run folder) has data for."""
    made = {
        "training_curves.png": training_curves_figure(run_dir),
        "reliability.png": reliability_figure(report),
        "routing.png": routing_figure(report),
        "experts_vs_generalist.png": experts_figure(report),
    }
    return {name: figure for name, figure in made.items() if figure is not None}


def reliability_line(report: dict) -> str | None:
    """The generalist's ECE before and after temperature scaling, as a sentence (None: not in the report)."""
    found = report.get("reliability")
    if not found:
        return None
    fitted = f"fitted on {found['fitted_on']}" if found.get("fitted_on") else "temperature scaling off"
    return (
        f"Generalist calibration on {found['split']} ({found['images']} images, {found['num_bins']} equal-width bins "
        f"of the top-1 probability): ECE {found['ece_before']:.4f} before temperature scaling, "
        f"{found['ece_after']:.4f} after (T = {found['temperature']:.3f}, {fitted})."
    )


def plots_section(report: dict, images: list[str]) -> list[str]:
    """The "Plots" section: each written plot as a relative image link, the ECE line with the reliability one."""
    if not images:
        return []
    lines = ["## Plots", ""]
    for name in [n for n in PLOT_FILES if n in images]:
        lines += [f"### {PLOT_FILES[name]}", ""]
        if name == "reliability.png" and reliability_line(report):
            lines += [reliability_line(report), ""]
        lines += [f"![{PLOT_FILES[name]}]({name})", ""]
    return lines

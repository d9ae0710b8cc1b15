"""adapt.csv (one row per finished round) and adapt.png (accuracy and offload ratio per round), both rewritten
atomically after every round, so a reader never sees half a table.

Rounds: 0 is the run's own generalist (nothing learnt yet); round r's row is measured after its fine-tuning, on
the same test images. `stream_images`, `offloaded` and `kept` say what round r collected with the previous
round's generalist and τ (empty for round 0); `eq_*` is the equal-accuracy operating point (askexpert/adapt/
measure.py).
"""

from __future__ import annotations

import csv
import io
import math

from askexpert.files.atomic import atomic_path, atomic_write_text

COLUMNS = (
    "round",
    "stream_images",
    "offloaded",
    "kept",
    "kept_total",
    "kept_label_acc",
    "steps",
    "stream_images_seen",
    "replay_images_seen",
    "tau",
    "temperature",
    "acc",
    "offload_ratio",
    "latency_ms",
    "energy_mj",
    "system_energy_mj",
    "routing_acc",
    "val_acc",
    "generalist_acc",
    "eq_tau",
    "eq_target_val_acc",
    "eq_val_acc",
    "eq_reached",
    "eq_acc",
    "eq_offload_ratio",
    "eq_latency_ms",
    "eq_energy_mj",
    "eq_system_energy_mj",
    "seconds",
)


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(value, 6) if isinstance(value, float) else value


def write_csv(path: str, rounds: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: _cell(row.get(key)) for key in COLUMNS} for row in rounds)
    atomic_write_text(path, buffer.getvalue())


def write_plot(path: str, rounds: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    x = [row["round"] for row in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("acc", "system (selected τ)"), ("eq_acc", "system (equal-accuracy τ)")):
        left.plot(x, [100 * row[key] for row in rounds], marker="o", label=label)
    left.plot(x, [100 * row["generalist_acc"] for row in rounds], marker="s", linestyle="--", label="generalist alone")
    left.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy")
    for key, label in (("offload_ratio", "selected τ"), ("eq_offload_ratio", "equal-accuracy τ")):
        right.plot(x, [100 * row[key] for row in rounds], marker="o", label=label)
    right.set(xlabel="round", ylabel="offloaded (%)", title="offload ratio")
    for axes in (left, right):
        axes.set_xticks(x)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:  # a temporary file, fsync, rename (askexpert/files/atomic.py)
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)

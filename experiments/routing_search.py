"""The design's routing alternatives on an ablation's finished runs, chosen on validation, reported on test.

    python experiments/routing_search.py --ablation runs/ablations/evidence     # after `make evidence`

For every finished cell whose runs train static experts beside their own (the claims' settings), every
combination of gate (max_prob, margin, entropy), top-k (1, 3, 5) and fusion (expert, product, mean) is
evaluated from the cell's cached logits (no model runs): τ chosen on the calibration split as always. Per
setting (the grid's other keys, e.g. the partition), the combination with the best mean system accuracy on
the split that chose τ, over seeds, is the "best on validation"; its test figures are reported next to the
default routing's, never used to choose. Writes OUT.json and OUT.md (default docs/results/evidence_routing.*).
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.ablation.results import mean_std  # noqa: E402
from experiments.finished_runs import arguments, finished_cells, load_compared_run, write_tables  # noqa: E402

GATES = ("max_prob", "margin", "entropy")
TOP_K = (1, 3, 5)
FUSIONS = ("expert", "product", "mean")


def figures(result: dict) -> dict:
    """What one routing setting gives on a run: test figures, the static experts at the same threshold, and
    the accuracy on the split that chose τ (the only one used to choose)."""
    selected, baselines = result["selected"], result["baselines"]
    return {
        "calib_acc": result["calibration"]["selected"]["acc"],
        "test_acc": selected["acc"],
        "offload_ratio": selected["offload_ratio"],
        "routing_acc": selected.get("routing_acc"),
        "static_acc": baselines["static_experts"]["acc"] if "static_experts" in baselines else None,
    }


def evaluate_cell(folder: Path) -> tuple[dict, dict[str, dict]] | None:
    """The run's own routing and every alternative, each reduced to `figures`; τ is always chosen on the
    calibration split (also where the run was given one). None for a run without static experts beside its own."""
    from askexpert.pipeline.settings import routing_config

    opened = load_compared_run(folder)
    if opened is None:
        return None
    settings, run = opened
    default = routing_config(settings.routing)
    default.threshold = None  # chosen on the calibration split, like every alternative
    combinations = [(default.gate, default.top_k, default.fusion)]  # the run's own, even when not in the grid
    combinations += [c for c in itertools.product(GATES, TOP_K, FUSIONS) if c != combinations[0]]
    out = {}
    for gate, top_k, fusion in combinations:
        routing = copy.deepcopy(default)
        routing.gate, routing.top_k, routing.fusion = gate, top_k, fusion
        out[f"{gate}/top{top_k}/{fusion}"] = figures(run.system.evaluate(routing))
    return {"name": f"{default.gate}/top{default.top_k}/{default.fusion}"}, out


def routing_stats(runs: list, name: str) -> dict:
    """Mean ± std over seeds of one routing's figures, and its paired gain over the static experts (points)."""
    found = [options[name] for _, _, options in runs]
    shown = {
        k: mean_std([f[k] for f in found if f[k] is not None]) for k in found[0] if any(f[k] is not None for f in found)
    }
    gains = [100 * (f["test_acc"] - f["static_acc"]) for f in found if f["static_acc"] is not None]
    shown["vs_static_points"] = mean_std(gains) if gains else None
    return shown


def summarise(per_run: list[tuple[dict, int, str, dict[str, dict]]]) -> dict:
    """Per setting: the default routing and the best one on validation (mean over seeds), with test figures."""
    by_setting: dict[str, list] = defaultdict(list)
    for cell, seed, default, options in per_run:
        by_setting[json.dumps(cell, sort_keys=True)].append((seed, default, options))
    summary = {}
    for key, runs in by_setting.items():
        names = list(runs[0][2])
        calib = {name: statistics.fmean(r[2][name]["calib_acc"] for r in runs) for name in names}
        best = max(names, key=lambda name: calib[name])
        default = runs[0][1]

        summary[key] = {
            "cell": json.loads(key),
            "seeds": sorted(r[0] for r in runs),
            "default": {"routing": default, **routing_stats(runs, default)},
            "best_on_validation": {"routing": best, **routing_stats(runs, best)},
            "validation_ranking": sorted(names, key=lambda name: -calib[name])[:5],
        }
    return summary


def markdown(summary: dict) -> str:
    def cell(value, scale=100.0, signed=False) -> str:
        if value is None:
            return "–"
        mean, std = value
        text = f"{scale * mean:+.2f}" if signed else f"{scale * mean:.2f}"
        return text + ("" if std is None else f" ± {scale * std:.2f}")

    lines = [
        "| setting | routing (gate/top-k/fusion) | chosen by | val/calib system acc % | test system acc % | "
        "vs static experts, points | offload % | routing acc % |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in summary.values():
        setting = ", ".join(f"{k}={v}" for k, v in entry["cell"].items())
        for label, found in (("default", entry["default"]), ("best on validation", entry["best_on_validation"])):
            lines.append(
                f"| {setting} | {found['routing']} | {label} | {cell(found.get('calib_acc'))} | "
                f"{cell(found.get('test_acc'))} | {cell(found.get('vs_static_points'), 1.0, True)} | "
                f"{cell(found.get('offload_ratio'))} | {cell(found.get('routing_acc'))} |"
            )
    seeds = sorted({s for e in summary.values() for s in e["seeds"]})
    lines += [
        "",
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))}. {len(GATES) * len(TOP_K) * len(FUSIONS)} "
        "routings per setting (gates x top-k x fusions); the best on validation is the one with the highest mean "
        "system accuracy on the split that chose τ. Test figures are reported, never used to choose.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = arguments(__doc__, "evidence_routing")
    per_run = []
    for cell, seed, folder in finished_cells(Path(args.ablation)):
        found = evaluate_cell(folder)
        if found is None:
            continue  # the claims' settings only: runs with static experts beside their own
        default, options = found
        per_run.append((cell, seed, default["name"], options))
        print(f"{folder}: {len(options)} routings", flush=True)
    if not per_run:
        raise SystemExit(f"no finished run with static experts beside its own in {args.ablation}")
    summary = summarise(per_run)
    write_tables(args.out, summary, markdown(summary))


if __name__ == "__main__":
    main()

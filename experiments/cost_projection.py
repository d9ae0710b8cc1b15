"""The evidence runs' offload shares priced with the trained models and with the GPU-size ones (cost model only).

Would the runs' routing decisions save latency and energy with the paper-size models? A projection, no training.

    python experiments/cost_projection.py --ablation runs/ablations/evidence      # after `make evidence`

The latency and energy claims compare the system with two alternatives whose costs depend on the models' size:
running the base model on the edge device, and sending every image to the near-edge. At the CPU evidence scale
the base model is tiny (a few ms on a Raspberry Pi 4), so a network round trip costs more than running it
locally, whatever the router does. This script keeps what the runs measured (the share of images each operating
point offloads, means over seeds) and prices it twice with the same cost model the reports use: with the models
the runs trained (checked to reproduce the runs' own baselines), and with the full-size GPU models of
configs/pipeline/standin_full.yaml. The second is a projection: those models were not trained here, and their
offload shares would differ. Writes OUT.json and OUT.md (default docs/results/evidence_costs.*).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments.finished_runs import arguments, write_tables  # noqa: E402

EVIDENCE, FULL = "configs/pipeline/cpu_evidence.yaml", "configs/pipeline/standin_full.yaml"
# the profiles priced; the check that the pricing reproduces the runs needs the runs' own among them
PROFILES = ["configs/profiles/pi4_wifi_orin.yaml", "configs/profiles/pi4_lte_orin.yaml"]
NUM_CLASSES = 100  # every model's head, experts included (fine-tuned from the all-class base); head FLOPs are tiny
POINTS = {"most accurate": "offload_ratio", "under budget": "constrained_offload_ratio"}


def trained_models(ablation: Path) -> tuple[dict[str, str], str]:
    """({generalist, base, experts: timm model name}, profile name) of an ablation's runs, from a finished cell's
    report.json (the cost model's own record of what it priced)."""
    for path in sorted((ablation / "cells").glob("*/seed*/report.json")):
        try:
            costs = json.loads(path.read_text())["costs"]
            models = costs["models"]
            experts = next(v for k, v in models.items() if k not in ("generalist", "base", "static"))
            found = {"generalist": models["generalist"]["model_name"], "base": models["base"]["model_name"]}
            return {**found, "experts": experts["model_name"]}, costs["profile"]["name"]
        except (OSError, ValueError, KeyError, StopIteration):
            continue
    raise SystemExit(f"no finished run with a readable report.json under {ablation}/cells")


def model_sets(trained: dict[str, str]) -> dict[str, dict[str, str]]:
    """The model sets to price: the trained ones, the trained generalist with GPU-size near-edge models (the
    paper's hierarchy: a light edge model, medium experts), and the GPU recipes' models throughout."""
    full = stage_models(FULL, FULL)
    return {
        "as trained": trained,
        "trained generalist, GPU-size base and experts": {**full, "generalist": trained["generalist"]},
        "GPU-size models": full,
    }


def stage_models(edge_config: str, near_edge_config: str) -> dict[str, str]:
    """{generalist, base, experts: timm model name}: the generalist from one pipeline config, the base model and
    the experts from another (the last stage config file that names a model wins, as in LightningCLI)."""
    models = {}
    for stage, config in (("generalist", edge_config), ("base", near_edge_config), ("experts", near_edge_config)):
        settings = yaml.safe_load((REPO / config).read_text())
        for path in settings[stage]["config"]:
            model = (yaml.safe_load((REPO / path).read_text()) or {}).get("model", {})
            name = (model.get("init_args") or {}).get("model_name")
            models[stage] = name or models.get(stage)
    return models


def offload_shares(results_csv: Path) -> dict[str, dict[str, float]]:
    """{setting: {point: mean offload share over seeds}} for the non-static settings of an ablation (a setting:
    the grid's columns, those before `seed`, less the specialization)."""
    per_run: dict[str, dict[str, dict]] = defaultdict(dict)
    with open(results_csv, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("seed", *POINTS.values()) if c not in header]
        if missing:
            raise SystemExit(f"{results_csv} is not the results.csv of an evidence ablation: no column {missing[0]}")
        grid = [c for c in header[: header.index("seed")] if c != "specialization"]
        for row in reader:
            if row.get("specialization") == "static":
                continue  # the static cells share the router's decisions; one family is enough
            setting = ", ".join(f"{c}={row[c]}" for c in grid) or "default"
            per_run[setting][row["seed"]] = row  # one row per expert, identical system columns
    shares = {}
    for setting, runs in per_run.items():
        shares[setting] = {
            point: statistics.fmean(float(r[column]) for r in runs.values())
            for point, column in POINTS.items()
            if all(r.get(column) not in (None, "") for r in runs.values())
        }
        shares[setting]["seeds"] = len(runs)
    return shares


def price(models: dict[str, str], profile_path: str) -> dict[str, float]:
    """Per-image latency and edge energy of the pieces a system is made of, for one model set and profile."""
    from askexpert.collab.costs import CostModel, load_profile, model_cost

    profile = load_profile(str(REPO / profile_path))
    cost = CostModel(profile)
    generalist = cost.on_edge(model_cost(profile, models["generalist"], NUM_CLASSES))
    expert = cost.offload(model_cost(profile, models["experts"], NUM_CLASSES))
    base = model_cost(profile, models["base"], NUM_CLASSES)
    return {
        "edge_ms": generalist.latency_ms,
        "edge_mj": generalist.edge_energy_mj,
        "offload_ms": expert.latency_ms,
        "offload_mj": expert.edge_energy_mj,
        "edge_execution_ms": cost.on_edge(base).latency_ms,
        "full_offload_mj": cost.offload(base).edge_energy_mj,
    }


def claims_at(share: float, c: dict[str, float]) -> dict[str, float]:
    """The latency and energy claims (in %) of a system that offloads `share` of its images."""
    latency = c["edge_ms"] + share * c["offload_ms"]
    energy = c["edge_mj"] + share * c["offload_mj"]
    return {
        "latency_vs_edge_execution": 100 * (latency / c["edge_execution_ms"] - 1),
        "energy_vs_full_offload": 100 * (energy / c["full_offload_mj"] - 1),
    }


def break_even(c: dict[str, float]) -> float:
    """The largest offload share at which the system is still as fast as edge execution (0 when never)."""
    return max(0.0, min(1.0, (c["edge_execution_ms"] - c["edge_ms"]) / c["offload_ms"]))


def project(shares: dict[str, dict[str, float]], sets: dict[str, dict[str, str]]) -> list[dict]:
    rows = []
    for set_name, models in sets.items():
        for profile in PROFILES:
            costs = price(models, profile)
            for setting, points in shares.items():
                rows.append(
                    {
                        "models": set_name,
                        "model_names": models,
                        "profile": Path(profile).stem,
                        "setting": setting,
                        "seeds": points["seeds"],
                        "break_even_share": break_even(costs),
                        "costs": costs,
                        "points": {
                            p: {"offload_share": points[p], **claims_at(points[p], costs)}
                            for p in POINTS
                            if p in points
                        },
                    }
                )
    return rows


def check_reproduces(rows: list[dict], results_csv: Path, profile: str) -> None:
    """The "as trained" pricing must give the runs' own baselines (base model on the edge, full offload): if it
    does not, the cost model or the profile changed since the runs, and the projection would compare unlike
    things."""
    with open(results_csv, newline="") as f:
        recorded = [r for r in csv.DictReader(f) if r.get("edge_medium_latency_ms") not in (None, "")]
    mine = next((r for r in rows if r["models"] == "as trained" and r["profile"] == profile), None)
    if mine is None or not recorded:
        return  # the runs used a profile this script does not price, or recorded no base model
    for key, column in (("edge_execution_ms", "edge_medium_latency_ms"), ("full_offload_mj", "full_offload_energy_mj")):
        ran = statistics.fmean(float(r[column]) for r in recorded)
        if abs(mine["costs"][key] / ran - 1) > 0.01:
            raise SystemExit(
                f"the cost model prices the trained base model at {mine['costs'][key]:.3f} ({key}) but the runs "
                f"recorded {ran:.3f} ({column}): the cost model or {profile} changed since the runs; rerun them"
            )


def markdown(rows: list[dict]) -> str:
    header = " | ".join(f"{p}: offloaded / latency / energy %" for p in POINTS)
    lines = [
        f"| models | profile | setting | {header} | break-even offload % | base on the edge ms |",
        "|---|---|---|" + "---:|" * len(POINTS) + "---:|---:|",
    ]
    for r in rows:
        cells = [
            "–"
            if p not in r["points"]
            else f"{100 * r['points'][p]['offload_share']:.1f} / {r['points'][p]['latency_vs_edge_execution']:+.1f} / "
            f"{r['points'][p]['energy_vs_full_offload']:+.1f}"
            for p in POINTS
        ]
        lines.append(
            f"| {r['models']} | {r['profile']} | {r['setting']} | "
            + " | ".join(cells)
            + f" | {100 * r['break_even_share']:.1f} | {r['costs']['edge_execution_ms']:.1f} |"
        )
    lines += [
        "",
        "Latency: the system's mean latency per image relative to the base model run on the edge; energy: the edge "
        "device's energy per image relative to sending every image to the base model (the paper: -45 % and "
        "-46 %). The offload shares are the runs' own (test split, means over seeds). *GPU-size* prices the same "
        "shares with configs/pipeline/standin_full.yaml's models: a projection, not a measurement (those models "
        "were not trained here, and would offload other shares). "
        "Break-even offload: the largest share of images the system may offload and still be as fast as the "
        "base model on the edge.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = arguments(__doc__, "evidence_costs")
    results = Path(args.ablation) / "results.csv"
    if not results.is_file():
        raise SystemExit(f"no results.csv in {args.ablation}: run `make evidence` first")
    try:
        shares = offload_shares(results)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"{results}: a share that is not a number ({err})") from None
    if not shares:
        raise SystemExit(f"no run with its own experts (not static) in {results}")
    trained, profile = trained_models(Path(args.ablation))
    rows = project(shares, model_sets(trained))
    check_reproduces(rows, results, profile)
    write_tables(args.out, rows, markdown(rows))


if __name__ == "__main__":
    main()

"""Would the evidence runs' routing decisions save latency and energy with the paper-size models? A cost-model
projection, no training.

    python experiments/cost_projection.py --ablation runs/ablations/evidence      # after `make evidence`

The latency and energy claims compare the system with two alternatives whose costs depend on the models' size:
running the base model on the edge device, and sending every image to the near-edge. At the CPU evidence scale
the base model is tiny (a few ms on a Raspberry Pi 4), so a network round trip costs more than running it
locally, whatever the router does. This script keeps what the runs measured (the share of images each operating
point offloads, means over seeds) and prices it twice with the same cost model the reports use: with the models
the runs trained (which reproduces the claims table), and with the full-size GPU models of
configs/pipeline/standin_full.yaml. The second is a projection: those models were not trained here, and their
offload shares would differ. Writes OUT.json and OUT.md (default docs/results/evidence_costs.*).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EVIDENCE, FULL = "configs/pipeline/cpu_evidence.yaml", "configs/pipeline/standin_full.yaml"
MODEL_SETS = {  # name -> (pipeline config of the generalist, of the base model and the experts)
    "as trained": (EVIDENCE, EVIDENCE),
    "trained generalist, GPU-size base and experts": (EVIDENCE, FULL),
    "GPU-size models": (FULL, FULL),
}
PROFILES = ["configs/profiles/pi4_wifi_orin.yaml", "configs/profiles/pi4_lte_orin.yaml"]
NUM_CLASSES = 100  # every model's head, experts included (fine-tuned from the all-class base); head FLOPs are tiny
POINTS = {"most accurate": "offload_ratio", "under budget": "constrained_offload_ratio"}


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
    """{setting: {point: mean offload share over seeds}} for the progressive settings of an ablation."""
    per_run: dict[str, dict[tuple, dict]] = defaultdict(dict)
    with open(results_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("specialization", "progressive") == "static":
                continue  # the static cells share the router's decisions; one family is enough
            setting = f"{row.get('partition.method', 'default')} partition"
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


def project(shares: dict[str, dict[str, float]]) -> list[dict]:
    rows = []
    for set_name, configs in MODEL_SETS.items():
        models = stage_models(*configs)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", default=str(REPO / "runs" / "ablations" / "evidence"))
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "evidence_costs"), help="OUT.json/.md")
    args = parser.parse_args()
    results = Path(args.ablation) / "results.csv"
    if not results.is_file():
        raise SystemExit(f"no results.csv in {args.ablation}: run `make evidence` first")
    shares = offload_shares(results)
    if not shares:
        raise SystemExit(f"no progressive run in {results}")
    rows = project(shares)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

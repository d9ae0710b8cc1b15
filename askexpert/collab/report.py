"""The evaluation report as files: report.json (everything), report.md (the tables a person reads),
pareto.png (accuracy against latency and against edge energy) and the plots of `collab/plots.py` (training
curves, reliability diagram, routing, experts vs the generalist), each written atomically.
"""

from __future__ import annotations

import io
import os

from askexpert.collab.budgets import limits_text
from askexpert.collab.plots import PLOT_FILES, figures, plots_section
from askexpert.collab.sanity import OFFLOAD_EVERYTHING_MIN, OFFLOAD_NOTHING_MAX, Finding, findings
from askexpert.files.atomic import atomic_write_bytes, atomic_write_text, write_json

# Rows of the headline table, in reading order: what the system is compared with, then the system.
HEADLINE_ROWS = (
    ("edge_only", "edge only (generalist on the edge)"),
    ("edge_medium", "edge medium (base model on the edge)"),
    ("full_offload", "full offload (base model on the near-edge)"),
    ("random_expert", "random expert (same offloaded samples)"),
    ("static_experts", "static experts (same router and threshold)"),
    ("selected", "**askexpert** (router + specialised experts)"),
    ("oracle_expert", "oracle expert (true class's expert, upper bound)"),
)
COLUMNS_HELP = (
    "accuracy: share of test images answered correctly; offload: share sent to the near-edge; latency: mean "
    "per image (edge compute + transfer + round trip + expert compute for offloaded ones); edge energy: the "
    "edge device's mean energy per image (compute, radio, idle wait); system energy: edge energy plus the "
    "near-edge accelerator's compute energy."
)


ALL_PASSED = (
    "All sanity checks passed: no model near chance, the base model and every expert above the generalist, "
    f"and the operating point offloads between {100 * OFFLOAD_NOTHING_MAX:g} % and {100 * OFFLOAD_EVERYTHING_MIN:g} % "
    "of the test images."
)


def report_findings(report: dict) -> list[Finding]:
    """The report's sanity findings (computed here for a report dictionary made without them)."""
    return report["findings"] if "findings" in report else findings(report)


def findings_lines(report: dict) -> list[str]:
    """The sanity findings as lines for a person, each `WARNING: ...`, or one line saying that all passed."""
    found = report_findings(report)
    return [f"WARNING: {f['message']}" for f in found] if found else [ALL_PASSED]


def findings_markdown(report: dict) -> list[str]:
    """The "Sanity findings" block that opens report.md (before any number a reader could quote)."""
    lines = ["## Sanity findings", "", *[f"- {line}" for line in findings_lines(report)], ""]
    if report_findings(report):
        lines += ["Warnings, not errors: the thresholds are defined in docs/collaborative.md, *Sanity findings*.", ""]
    return lines


def second_expert_label(point: dict, suffix: str = "") -> str:
    """The headline label of a two-expert point: its margin, its fusion and how often it asks two experts."""
    return (
        f"**askexpert + second expert**{suffix} (margin {point['margin']:.2f}, `{point['fusion']}` fusion, "
        f"{100 * point['second_ratio']:.1f} % of images asked of two)"
    )


def headline_rows(report: dict) -> list[tuple[str, dict]]:
    found = {**report["baselines"], "selected": report["selected"]}
    rows = []
    for key, label in HEADLINE_ROWS:
        if key in found:
            rows.append((label, found[key]))
        if key == "selected" and "second_expert" in report:  # next to the one-expert system and the oracle
            rows.append((second_expert_label(report["second_expert"]), report["second_expert"]))
    point = report.get("constrained")
    if point:  # the second operating point, chosen under its budget on the same split as the selected one
        limits = limits_text(point["budget"])
        if "static_experts" in point:
            rows.append((f"static experts, same threshold as below ({limits})", point["static_experts"]))
        rows.append((f"**askexpert under budget** ({limits})", point))
        if "second_expert" in point:
            rows.append(
                (second_expert_label(point["second_expert"], f" under budget ({limits})"), point["second_expert"])
            )
    return rows


def headline_table(report: dict) -> str:
    lines = [
        "| system | accuracy | offload | latency (ms) | edge energy (mJ) | system energy (mJ) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in headline_rows(report):
        lines.append(
            f"| {label} | {100 * r['acc']:.2f} % | {100 * r['offload_ratio']:.1f} % | {r['latency_ms']:.2f} | "
            f"{r['energy_mj']:.2f} | {r['system_energy_mj']:.2f} |"
        )
    return "\n".join(lines)


def _relative(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f} %" if b else "n/a"


def claims(report: dict) -> list[str]:
    """The research paper's four comparisons, computed on this run (see README)."""
    s, b = report["selected"], report["baselines"]
    out = []
    if report["experts"]:
        gains = [e["subset_test_acc"] - e["generalist_subset_test_acc"] for e in report["experts"]]
        out.append(
            f"experts vs the generalist on their own classes: {100 * sum(gains) / len(gains):+.2f} points (mean)"
        )
    if s.get("routing_acc") is not None:
        out.append(f"offloaded images sent to an expert that owns their class: {100 * s['routing_acc']:.1f} %")
    if "static_experts" in b:
        gain = 100 * (s["acc"] - b["static_experts"]["acc"])
        out.append(f"system vs the same system with static experts: {gain:+.2f} points")
    if "edge_medium" in b:
        out.append(
            f"latency vs edge execution of the base model: {_relative(s['latency_ms'], b['edge_medium']['latency_ms'])}"
        )
    if "full_offload" in b:
        out.append(f"edge energy vs offloading everything: {_relative(s['energy_mj'], b['full_offload']['energy_mj'])}")
    if "second_expert" in report:
        out.append(second_expert_claim(report["second_expert"], s, "at the selected point's budget"))
    point = report.get("constrained")
    if point and "second_expert" in point:
        out.append(second_expert_claim(point["second_expert"], point, f"under {limits_text(point['budget'])}"))
    if point:
        text = (
            f"under the budget ({limits_text(point['budget'])}): {100 * point['acc']:.2f} % at "
            f"{100 * point['offload_ratio']:.1f} % offload"
        )
        if "static_experts" in point:
            text += f", {100 * (point['acc'] - point['static_experts']['acc']):+.2f} points vs static experts"
        if "edge_medium" in b:
            text += f"; latency {_relative(point['latency_ms'], b['edge_medium']['latency_ms'])} vs edge execution"
        if "full_offload" in b:
            text += f", edge energy {_relative(point['energy_mj'], b['full_offload']['energy_mj'])} vs full offload"
        out.append(text)
    return out


def second_expert_claim(pair: dict, one: dict, where: str) -> str:
    """The two-expert system against the one-expert system chosen under the same limits."""
    return (
        f"second expert {where}: {100 * pair['acc']:.2f} % at {100 * pair['offload_ratio']:.1f} % offload "
        f"({100 * pair['second_ratio']:.1f} % asked of two), {100 * (pair['acc'] - one['acc']):+.2f} points vs one "
        f"expert ({100 * one['acc']:.2f} % at {100 * one['offload_ratio']:.1f} %); "
        f"latency {_relative(pair['latency_ms'], one['latency_ms'])}, "
        f"system energy {_relative(pair['system_energy_mj'], one['system_energy_mj'])}"
    )


def markdown(report: dict, images: list[str] | None = None) -> str:
    """report.md; `images`: the plot files written next to it (`collab/plots.py`), linked in a "Plots" section."""
    data = report["data"]
    label = "STAND-IN synthetic data, not CIFAR-100" if data["stand_in"] else f"{data['source']} data"
    lines = [
        f"# askexpert report ({label})",
        "",
        *findings_markdown(report),
        *_results_section(report),
        *plots_section(report, images or []),
        *_models_section(report),
        *_costs_section(report),
        *_sweep_section(report),
    ]
    p = report["provenance"]
    lines += [
        "",
        f"Revision {p['git_revision']}, seed {p['seed']}, {', '.join(f'{k} {v}' for k, v in p['packages'].items())}.",
        "",
    ]
    return "\n".join(lines)


def _operating_point_text(report: dict) -> str:
    """The sentence on the data and where and how the operating point was chosen."""
    data, sel, routing = report["data"], report["selected"], report["routing"]
    return (
        f"{data['num_classes']} classes, {data['train_size']} training and {data['test_size']} test images"
        + (f", {data['calib_size']} held out for calibration" if data.get("calib_size") else "")
        + ". "
        f"Operating point chosen on {sel['chosen_on']}: threshold {sel['threshold']:.2f} on the "
        f"`{routing['gate']}` gate (temperature {routing['temperature_value']:.2f}), top-{routing['top_k']} expert "
        f"choice, `{routing['fusion']}` fusion"
        + (f", budget {limits_text(routing['budget'])}" if routing.get("budget") else "")
        + (
            f"; a second point under {limits_text(routing['constrained'])} at threshold "
            f"{report['constrained']['threshold']:.2f}"
            if report.get("constrained")
            else ""
        )
        + "."
    )


def _results_section(report: dict) -> list[str]:
    return [
        "## Results",
        "",
        _operating_point_text(report),
        "",
        headline_table(report),
        "",
        COLUMNS_HELP,
        "",
        "## The research claims, measured on this run",
        "",
        *[f"- {line}" for line in claims(report)],
        "",
    ]


def _table_start(title: str, header: str, rule: str, intro: str | None = None) -> list[str]:
    """A section's heading and its table's first two rows, with a sentence between them where one is given."""
    return [f"## {title}", "", *([intro, ""] if intro else []), header, rule]


def _models_section(report: dict) -> list[str]:
    lines = _table_start(
        "Models",
        "| model | architecture | params | classes | init | strategy | accuracy on its classes | generalist there |",
        "|---|---|---:|---:|---|---|---:|---:|",
    )
    g = report["generalist"]
    lines.append(f"| generalist | {g['model_name']} | {g['params']:,} | all | | | {100 * g['test_acc']:.2f} % | |")
    if report.get("base"):
        b = report["base"]
        lines.append(f"| base | {b['model_name']} | {b['params']:,} | all | | | {100 * b['test_acc']:.2f} % | |")
    for e in [*report["experts"], *report.get("static_experts", [])]:
        lines.append(
            f"| {e['name']} | {e['model_name']} | {e['params']:,} | {len(e['classes'])} | {e['init']} "
            f"| {e['strategy']} | {100 * e['subset_test_acc']:.2f} % | {100 * e['generalist_subset_test_acc']:.2f} % |"
        )
    return lines


def _costs_section(report: dict) -> list[str]:
    costs = report["costs"]
    profile = costs["profile"]
    intro = (
        f"Profile `{profile['name']}` ({profile['path']}): edge {profile['edge']}, near-edge {profile['near_edge']}, "
        f"link {profile['link']}; {costs['image_bytes']:.0f} bytes per image."
    )
    header = "| model | GFLOPs | edge (ms) | near-edge (ms) | how |"
    lines = ["", *_table_start("Costs per image", header, "|---|---:|---:|---:|---|", intro)]
    for name, c in costs["models"].items():
        how = (
            c["edge_source"]
            if c["edge_source"] == c["near_edge_source"]
            else f"{c['edge_source']} / {c['near_edge_source']}"
        )
        lines.append(f"| {name} | {c['gflops']:.4f} | {c['edge_ms']:.2f} | {c['near_edge_ms']:.2f} | {how} |")
    return lines


def _sweep_section(report: dict) -> list[str]:
    """Every tenth row of the test sweep."""
    header = "| threshold | offload | accuracy | latency (ms) | edge energy (mJ) |"
    lines = ["", *_table_start("Threshold sweep (test)", header, "|---:|---:|---:|---:|---:|")]
    for r in report["sweep"][::10]:
        lines.append(
            f"| {r['threshold']:.2f} | {100 * r['offload_ratio']:.1f} % | {100 * r['acc']:.2f} % | "
            f"{r['latency_ms']:.2f} | {r['energy_mj']:.2f} |"
        )
    return lines


def pareto_figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    points = {**report["baselines"], "askexpert": report["selected"]}
    if report.get("constrained"):
        points["askexpert (budget)"] = report["constrained"]
    for axis, key, title in (
        (axes[0], "latency_ms", "latency per image (ms)"),
        (axes[1], "energy_mj", "edge energy per image (mJ)"),
    ):
        axis.plot(
            [r[key] for r in report["sweep"]],
            [100 * r["acc"] for r in report["sweep"]],
            "-",
            color="tab:blue",
            label="router, threshold sweep (test)",
        )
        for name, r in points.items():
            marker = "*" if name.startswith("askexpert") else "o"
            axis.plot(r[key], 100 * r["acc"], marker, markersize=12 if marker == "*" else 6)
            axis.annotate(name, (r[key], 100 * r["acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(title)
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    stand_in = " - STAND-IN data, not CIFAR-100" if report["data"]["stand_in"] else ""
    figure.suptitle(f"accuracy vs cost{stand_in}")
    figure.tight_layout()
    return figure


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


PLOTS_ENV = "ASKEXPERT_REPORT_PLOTS"  # 0 / false / no: no diagnostic plots (pareto.png is always written)


def diagnostic_plots_wanted() -> bool:
    """Whether reports get the diagnostic plots (about 1.3 s per report on 2 CPU cores). On by default; a large
    grid of cells on a slow machine (or the test suite, which writes a hundred tiny reports) may turn them off."""
    return os.environ.get(PLOTS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def write_report(report: dict, folder: str, run_dir: str | None = None) -> dict[str, str]:
    """Write report.json, report.md, pareto.png and the plots of `collab/plots.py` that the report (and the run
    folder `run_dir`, default `folder`, for the training curves) has data for into `folder`; returns their paths."""
    paths = {name: os.path.join(folder, name) for name in ("report.json", "report.md", "pareto.png")}
    atomic_write_bytes(paths["pareto.png"], _png(pareto_figure(report)))
    for name, figure in (figures(report, run_dir or folder) if diagnostic_plots_wanted() else {}).items():
        paths[name] = os.path.join(folder, name)
        atomic_write_bytes(paths[name], _png(figure))
    atomic_write_text(paths["report.md"], markdown(report, [name for name in paths if name in PLOT_FILES]))
    write_json(paths["report.json"], report)
    return paths


def log_to_wandb(
    report: dict,
    paths: dict[str, str],
    folder: str,
    project: str,
    name: str | None = None,
    group: str | None = None,
    job_type: str = "evaluation",
    tags: list[str] | None = None,
    entity: str | None = None,
) -> None:
    """The sweep, the headline table and the plot as a W&B run (offline unless WANDB_MODE or a sweep agent), of
    the pipeline run's `group` (askexpert/pipeline/wandb_runs.py)."""
    import wandb

    from askexpert.runs.folder import wandb_should_be_offline

    run = wandb.init(
        project=project,
        entity=entity,
        name=name or os.path.basename(os.path.abspath(folder)),
        group=group,
        tags=tags,
        dir=folder,
        mode="offline" if wandb_should_be_offline() else None,
        job_type=job_type,
        config={"routing": report["routing"], "data": report["data"]},
        reinit="finish_previous",
    )
    try:
        columns = ["threshold", "offload_ratio", "acc", "latency_ms", "energy_mj", "system_energy_mj"]
        run.log(
            {
                "sweep": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in report["sweep"]]),
                "systems": wandb.Table(
                    columns=["system", *columns[1:]],
                    data=[[label, *[r[c] for c in columns[1:]]] for label, r in headline_rows(report)],
                ),
                "pareto": wandb.Image(paths["pareto.png"]),
                **{name.removesuffix(".png"): wandb.Image(paths[name]) for name in PLOT_FILES if name in paths},
            }
        )
        run.summary.update({f"selected/{k}": v for k, v in report["selected"].items() if isinstance(v, float)})
        found = report_findings(report)
        run.summary.update({"findings/count": len(found), "findings/text": "\n".join(findings_lines(report))})
    finally:
        run.finish()

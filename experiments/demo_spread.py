"""How much the demo's numbers move between runs: the demo pipeline at other seeds and thread counts.

    python experiments/demo_spread.py        # about 19 min on 2 CPU cores; finished runs are reused

The README's headline table is one run (seed 0, this machine's thread count). This trains the same pipeline
(configs/pipeline/demo.yaml) once per variant below, each in its own process and run folder
(`runs/demo_spread/<variant>`), and writes `docs/results/demo_spread.md`: each run's key numbers and, per
number, the range over all of them, so the README can word its reading to hold for every run. A rerun skips
the stages that are done (the pipeline's own resume), so it only rebuilds the table. STAND-IN data, not
CIFAR-100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.collab.report import report_findings  # noqa: E402

# (variant, seed, torch threads; None = torch's default, this machine's core count)
VARIANTS = [("seed0", 0, None), ("seed0_1thread", 0, 1), ("seed1", 1, None), ("seed2", 2, None)]
# (column, how to read it from report.json, format)
COLUMNS = [
    ("generalist acc", lambda r: r["generalist"]["test_acc"], "{:.2%}"),
    ("base acc", lambda r: r["base"]["test_acc"], "{:.2%}"),
    ("τ", lambda r: r["selected"]["threshold"], "{:.2f}"),
    ("offload", lambda r: r["selected"]["offload_ratio"], "{:.1%}"),
    ("askexpert acc", lambda r: r["selected"]["acc"], "{:.2%}"),
    ("static experts acc", lambda r: r["baselines"]["static_experts"]["acc"], "{:.2%}"),
    ("oracle acc", lambda r: r["baselines"]["oracle_expert"]["acc"], "{:.2%}"),
    ("routing acc", lambda r: r["selected"]["routing_acc"], "{:.1%}"),
    ("experts − generalist, own classes (points)", lambda r: expert_gain(r), "{:+.2f}"),
    (
        "askexpert − edge only (points)",
        lambda r: 100 * (r["selected"]["acc"] - r["baselines"]["edge_only"]["acc"]),
        "{:+.2f}",
    ),
    (
        "askexpert − static (points)",
        lambda r: 100 * (r["selected"]["acc"] - r["baselines"]["static_experts"]["acc"]),
        "{:+.2f}",
    ),
    ("latency (ms)", lambda r: r["selected"]["latency_ms"], "{:.2f}"),
    ("edge energy (mJ)", lambda r: r["selected"]["energy_mj"], "{:.2f}"),
]


def expert_gain(report: dict) -> float:
    """Mean accuracy gain, in points, of the (progressive) experts over the generalist on their own classes."""
    gains = [e["subset_test_acc"] - e["generalist_subset_test_acc"] for e in report["experts"]]
    return 100 * sum(gains) / len(gains)


def run_variant(out: Path, seed: int, threads: int | None) -> tuple[dict, float]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op thread count
    command = [sys.executable, "-m", "askexpert", "pipeline", "--config", "configs/pipeline/demo.yaml"]
    command += ["--out", str(out), "--seed", str(seed)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start


def table(rows: list[tuple[str, int, dict]]) -> str:
    header = ["run", "seed", "threads", *(name for name, _, _ in COLUMNS), "findings"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * len(COLUMNS) + "---|"]
    for variant, seed, report in rows:
        cells = [variant, str(seed), str(report["provenance"].get("torch_threads"))]
        cells += [fmt.format(get(report)) for _, get, fmt in COLUMNS]
        cells.append("; ".join(f"{f['check']} ({f['subject']})" for f in report_findings(report)) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    ranges = ["**range**", "", ""]
    for _, get, fmt in COLUMNS:
        values = [get(report) for _, _, report in rows]
        ranges.append(f"{fmt.format(min(values))} – {fmt.format(max(values))}")
    lines.append("| " + " | ".join(ranges) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo_spread", help="one run folder per variant inside it")
    parser.add_argument("--doc", default="docs/results/demo_spread.md")
    args = parser.parse_args()
    rows = []
    for variant, seed, threads in VARIANTS:
        report, seconds = run_variant(REPO / args.out / variant, seed, threads)
        print(f"{variant}: {seconds:.0f} s", flush=True)
        rows.append((variant, seed, report))
    revision = rows[0][2]["provenance"].get("git_revision")
    text = (
        "# The demo over several runs (STAND-IN data, not CIFAR-100)\n\n"
        f"`python experiments/demo_spread.py` at revision {revision}, on this project's 2-core CPU machine: "
        "`configs/pipeline/demo.yaml` at other seeds (`--seed`, every training stage's `seed_everything`) and "
        "thread counts (`OMP_NUM_THREADS`). The README's headline table is the `seed0` row. Findings are the "
        "sanity findings each report opens with (docs/collaborative.md).\n\n" + table(rows) + "\n"
    )
    doc = REPO / args.doc
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

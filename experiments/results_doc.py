"""Fill the generated blocks of docs/results.md from the shipped ablations' results.

    make ablations                     # runs (or, when finished, just re-reads) the three ablations
    python experiments/results_doc.py  # rewrites the blocks between <!-- generated:NAME --> markers
                                       # and copies each results.png to docs/results/<name>_stand_in.png

Each block is rebuilt from `runs/ablations/<name>/results.csv` (the tables are `ablate`'s own results.md
tables) and, for the research claims, from the same rows: paired differences per seed, then mean ± sample
std over seeds. The prose around the blocks is written by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.ablation import results  # noqa: E402

ABLATIONS = ("strategies", "partitions", "experts_topk")
PAPER = {"subsets": 4.12, "overall": 2.76, "latency": -45.0, "energy": -46.0}


def load(folder: Path) -> tuple[list[str], list[dict]]:
    header, rows = results.read_csv(str(folder / "results.csv"))
    columns = header[: header.index("seed")]
    return columns, rows


def table(columns: list[str], rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows}, key=int)
    counts = defaultdict(set)
    for row in rows:
        counts[tuple(row[c] for c in columns)].add(row["seed"])
    note = f"Seeds {', '.join(seeds)}; {len(counts)} settings; mean ± sample std over seeds."
    return note + "\n\n" + results.markdown_table(results.aggregate(rows, columns), columns)


def per_seed(rows: list[dict], key: str, **match) -> dict[str, float]:
    """A metric per seed for the rows matching `match` (per-expert metrics averaged over the seed's experts)."""
    found = defaultdict(list)
    for row in rows:
        if all(row[k] == v for k, v in match.items()) and row[key] not in ("", None):
            found[row["seed"]].append(float(row[key]))
    return {seed: statistics.fmean(values) for seed, values in found.items()}


def paired(a: dict[str, float], b: dict[str, float], relative: bool = False) -> tuple[float, float | None, int]:
    seeds = sorted(set(a) & set(b), key=int)
    diffs = [100 * (a[s] / b[s] - 1) if relative else 100 * (a[s] - b[s]) for s in seeds]
    mean, std = results.mean_std(diffs)
    return mean, std, len(seeds)


def claims(rows: list[dict]) -> str:
    ours = {"specialization": "progressive", "experts.init": "base"}
    static = {"specialization": "static", "experts.init": "base"}
    lines = [
        "| paper's claim | paper | stand-in (progressive experts, init base) | same direction |",
        "|---|---:|---:|---|",
    ]

    def add(text: str, paper: float, value: tuple, unit: str) -> None:
        mean, std, n = value
        shown = f"{mean:+.2f}" + ("" if std is None else f" ± {std:.2f}") + f" {unit} ({n} seeds)"
        if std is not None and abs(mean) < std:
            verdict = "no clear difference (mean within 1 std)"
        else:
            verdict = "yes" if mean * paper > 0 else "no, the opposite"
        lines.append(f"| {text} | {paper:+.2f} {unit} | {shown} | {verdict} |")

    add(
        "experts on their own classes vs the generalist",
        PAPER["subsets"],
        paired(per_seed(rows, "subset_test_acc", **ours), per_seed(rows, "generalist_subset_test_acc", **ours)),
        "points",
    )
    add(
        "experts on their own classes vs static experts (same init)",
        PAPER["subsets"],
        paired(per_seed(rows, "subset_test_acc", **ours), per_seed(rows, "subset_test_acc", **static)),
        "points",
    )
    add(
        "system accuracy vs the same system with static experts",
        PAPER["overall"],
        paired(per_seed(rows, "system_acc", **ours), per_seed(rows, "system_acc", **static)),
        "points",
    )
    add(
        "latency vs running the base model on the edge",
        PAPER["latency"],
        paired(per_seed(rows, "latency_ms", **ours), per_seed(rows, "edge_medium_latency_ms", **ours), True),
        "%",
    )
    add(
        "edge energy vs offloading every image",
        PAPER["energy"],
        paired(per_seed(rows, "energy_mj", **ours), per_seed(rows, "full_offload_energy_mj", **ours), True),
        "%",
    )
    offload = results.mean_std(list(per_seed(rows, "offload_ratio", **ours).values()))
    edge = results.mean_std(list(per_seed(rows, "edge_only_acc", **ours).values()))
    routing = results.mean_std(list(per_seed(rows, "routing_acc", **ours).values()))
    lines += [
        "",
        f"At the selected operating points the system offloads {100 * offload[0]:.1f} % of the test images "
        f"(± {100 * (offload[1] or 0):.1f} over seeds); the generalist alone is right on {100 * edge[0]:.2f} % of "
        f"all test images, and {100 * routing[0]:.1f} % of the offloaded images reach an expert that owns their "
        "class (means over seeds).",
    ]
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/results.md has no block <!-- generated:{name} -->")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "ablations"), help="folder of the three ablations")
    parser.add_argument("--doc", default=str(REPO / "docs" / "results.md"))
    args = parser.parse_args()
    doc = Path(args.doc)
    text = doc.read_text()
    for name in ABLATIONS:
        folder = Path(args.runs) / name
        if not (folder / "results.csv").is_file():
            raise SystemExit(f"{folder}/results.csv not found: run `make ablations` first")
        columns, rows = load(folder)
        shutil.copyfile(folder / "results.png", doc.parent / "results" / f"{name}_stand_in.png")
        text = replace_block(text, name, table(columns, rows))
        if name == "strategies":
            text = replace_block(text, "claims", claims(rows))
    doc.write_text(text)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()

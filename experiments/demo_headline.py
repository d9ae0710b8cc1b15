"""The demo's headline for the README: the sanity findings and the table `make demo` prints, from its report.

    python experiments/demo_headline.py --run runs/demo    # -> docs/results/demo_headline_stand_in.md
    python experiments/results_doc.py                       # puts it in the README's demo_headline block

Everything comes from RUN/report.json through the functions the pipeline prints with, so the README shows exactly
what `make demo` printed on the machine that ran it (with the revision and thread count, since another CPU or
thread count changes the numbers: docs/results/demo_spread.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "docs" / "results" / "demo_headline_stand_in.md"


def headline(report: dict) -> str:
    from askexpert.collab.report import findings_lines, headline_table

    data, selected = report["data"], report["selected"]
    label = "STAND-IN synthetic data, not CIFAR-100" if data["stand_in"] else f"{data['source']} data"
    findings = [line for line in findings_lines(report) if line.strip()]
    provenance = report.get("provenance", {})
    lines = [f"Collaborative inference on {data['test_size']} test images ({label}):", ""]
    if findings:
        lines += ["```", *findings, "```", ""]
    lines += [headline_table(report), ""]
    lines.append(
        f"Threshold τ = {selected['threshold']:.2f} on the `{report['routing']['gate']}` gate, chosen on "
        f"{selected['chosen_on']}; revision {provenance.get('git_revision', '?')}, torch "
        f"{provenance.get('packages', {}).get('torch', '?')} with {provenance.get('torch_threads', '?')} threads."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "runs" / "demo"), help="the demo's run folder")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    path = Path(args.run) / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read {path} ({err}); run `make demo` first") from None
    Path(args.out).write_text(headline(report))
    print(f"wrote {args.out}")
    # the report's plots beside it, for docs/results.md and the README (pareto.png and the diagnostics)
    from askexpert.collab.plots import PLOT_FILES

    for name in ("pareto.png", *PLOT_FILES):
        source = Path(args.run) / name
        if source.is_file():
            target = Path(args.out).parent / f"demo_{Path(name).stem}_stand_in.png"
            shutil.copyfile(source, target)
            print(f"copied {source} -> {target}")


if __name__ == "__main__":
    main()

"""The README's export figures, from the demo's export manifest (what `export` verified and measured).

python -m askexpert export --run runs/demo --out runs/demo_export --int8 true
python experiments/demo_export.py --export runs/demo_export   # -> docs/results/demo_export_stand_in.md
python experiments/results_doc.py                              # puts it in the README's demo_export block
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "results" / "demo_export_stand_in.md"


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)} to {fmt.format(high)}"


def summary(manifest: dict) -> str:
    models = manifest["models"]
    check = manifest["verification"]
    routing = check["routing"]
    agreement = [100 * m["verification"]["top1_agreement"] for m in models.values()]
    diffs = [m["verification"]["max_abs_logit_diff"] for m in models.values()]
    text = (
        f"On the demo run ({routing['images']} STAND-IN test images): every model the same top-1 on "
        f"{_span(agreement, '{:.2f} %')} of the images, max |logit diff| {_span(diffs, '{:.1e}')}, "
        f"{routing['routing_flips']} routing decisions changed."
    )
    int8 = check.get("int8")
    if int8:
        generalist = 100 * models["generalist"]["int8"]["verification"]["top1_agreement"]
        experts = [100 * m["int8"]["verification"]["top1_agreement"] for n, m in models.items() if n != "generalist"]
        text += (
            f" int8: {generalist:.1f} % (generalist) and {_span(experts, '{:.1f} %')} (experts) the same top-1, "
            f"{int8['routing_flips']} of {int8['images']} routing decisions changed, system accuracy "
            f"{100 * int8['system_accuracy_fp32']:.2f} -> {100 * int8['system_accuracy_int8']:.2f} % (STAND-IN data: "
            "models near chance, so the sign means little)."
        )
    return text + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default=str(REPO / "runs" / "demo_export"), help="the demo's export folder")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    path = Path(args.export) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read {path} ({err}); export the demo run first (this script's docstring)") from None
    Path(args.out).write_text(summary(manifest))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

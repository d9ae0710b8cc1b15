"""Per-step framework overhead of two checkouts, measured alternately by the same script (the CPU proxy of the
GPU's "full step vs bare step" gap).

Each round runs `benchmarks/train_throughput.py --overhead-only` of *this* checkout once per compared
checkout, in a fresh process whose `--checkout` puts that checkout's askexpert, datamodules and strategies
first on `sys.path` (the JSON of every run records the files it imported). The order alternates between
rounds and every run interleaves its own repeats, so a shared, noisy machine drifts into both sides alike;
the figures are medians over all repeats of all rounds.

    python benchmarks/overhead_before_after.py --before /tmp/askexpert_before          # ~4 min on 2 cores

Writes benchmarks/results/overhead_before_after_<device>.json and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "bare": "bare step (fwd + bwd + AdamW, batch already on the device)",
    "full": "full step, Trainer without progress bar or logger",
    "cli": "full step as users run it (the CLI's Trainer: CSV logger, progress bar, callbacks)",
}


def run_once(checkout: Path, args: argparse.Namespace, folder: Path, tag: str) -> dict:
    out = folder / f"{tag}.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--overhead-only"]
    command += ["--device", args.device, "--checkout", str(checkout), "--repeats", str(args.repeats)]
    command += ["--overhead-steps", str(args.steps), "--threads", str(args.threads), "--out", str(out)]
    if args.batch:
        command += ["--overhead-batch", str(args.batch)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(out.read_text())
    wanted = str(checkout.resolve())
    for package, where in report["imported"].items():  # the checkout measured is the one asked for
        if not where.startswith(wanted):
            raise SystemExit(f"{tag}: {package} was imported from {where}, not from {wanted}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="/tmp/askexpert_before", help="checkout of the code before")
    parser.add_argument("--after", default=str(ROOT), help="checkout of the code after (default: this one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats inside each run")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the measured runs: on a shared 2-core machine two threads that compete with other "
        "processes make every operation 30-40x slower and the figures meaningless",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    checkouts = {"before": Path(args.before), "after": Path(args.after)}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for label in order:
                report = run_once(checkouts[label], args, Path(folder), f"{label}-{r}")
                runs[label].append(report)
                o = report["overhead"]
                print(
                    f"round {r + 1} {label}: ms/step wall (CPU): bare {o['bare_ms']:.2f} ({o['bare_cpu_ms']:.2f}), "
                    f"full {o['full_ms']:.2f} ({o['full_cpu_ms']:.2f}), "
                    f"users' {o['cli_ms']:.2f} ({o['cli_cpu_ms']:.2f})",
                    flush=True,
                )
    summary: dict[str, dict] = {}
    for label, reports in runs.items():
        entry: dict = {"checkout": str(checkouts[label]), "imported": reports[0]["imported"]}
        for clock, key in (("", "runs_ms"), ("_cpu", "runs_cpu_ms")):
            samples = {v: [ms for rep in reports for ms in rep["overhead"][key][v]] for v in VARIANTS}
            med = {v: statistics.median(values) for v, values in samples.items()}
            entry.update({f"{v}{clock}_ms": med[v] for v in VARIANTS})
            entry[f"overhead_full{clock}_ms"] = med["full"] - med["bare"]
            entry[f"overhead_cli{clock}_ms"] = med["cli"] - med["bare"]
            entry[f"samples{clock}_ms"] = samples
        entry["cli"] = reports[0]["overhead"]["cli"]
        summary[label] = entry
    first = runs["after"][0]["overhead"]
    result = {
        "device": runs["after"][0]["device"],
        "threads": runs["after"][0]["threads"],
        "torch": runs["after"][0]["torch"],
        "model": first["model"],
        "batch": first["batch"],
        "precision": first["precision"],
        "steps_per_repeat": args.steps,
        "torch_threads": args.threads,
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "variants": VARIANTS,
        **summary,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"overhead_before_after_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{first['model']}, batch {first['batch']}, {first['precision']}: ms per step (median of "
        f"{args.rounds * args.repeats} repeats each)"
    )
    print(f"{'':14} {'bare':>8} {'full':>8} {'users':>8} {'full-bare':>10} {'users-bare':>11}")
    for clock, name in (("_cpu", "CPU"), ("", "wall")):
        for label in ("before", "after"):
            s = summary[label]
            print(
                f"{label + ' ' + name:14} {s[f'bare{clock}_ms']:8.2f} {s[f'full{clock}_ms']:8.2f} "
                f"{s[f'cli{clock}_ms']:8.2f} {s[f'overhead_full{clock}_ms']:10.2f} {s[f'overhead_cli{clock}_ms']:11.2f}"
            )
    print(f"-> {out}")


if __name__ == "__main__":
    main()

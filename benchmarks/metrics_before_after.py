"""Do two checkouts compute the same thing? The same tiny runs with each, their metrics.csv compared value by value.

Runs, per checkout (as `python -m askexpert` with that checkout first on PYTHONPATH, one thread, seed 0, 2
epochs of the micro ViT on the stand-in): a base model, a generalist with Mixup + CutMix, a progressive
expert with distillation and unfreezing, and a dustbin expert (both from the base). Then it compares every
value the two checkouts both logged (losses, accuracies, superclass metrics, the experts' subset metrics and
drawn shares), step by step. Identical values mean the same batches, augmentations, losses and metrics.

    python benchmarks/metrics_before_after.py --before /tmp/askexpert_before      # ~4 min on 2 cores

Writes benchmarks/results/metrics_before_after.json and prints one line per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--seed_everything=0",
    "--model.model_name=vit_micro_patch8_32",
    "--model.drop_path_rate=0.0",
    "--data.synthetic_train_per_class=10",
    "--data.synthetic_test_per_class=2",
    "--data.batch_size=32",
    "--data.eval_batch_size=50",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=5",
]


def runs(folder: Path) -> dict[str, list[str]]:
    expert = ["--model=askexpert.modules.ExpertModule", f"--model.base_path={folder}/base/checkpoints/best.ckpt"]
    expert += [f"--partition={folder.parent}/partition.json", "--expert_index=1"]
    return {
        "base": ["--model=askexpert.modules.BaseModule", "--trainer.max_epochs=1"],
        "generalist_mixup": ["--model.mixup_alpha=0.8", "--model.cutmix_alpha=1.0"],
        "expert_progressive_distill": expert
        + [
            "--specialization=progressive",
            "--specialization.distill_weight=0.5",
            "--specialization.unfreeze_until=0.5",
        ],
        "expert_dustbin": expert + ["--specialization=dustbin"],
    }


def run_all(checkout: Path, folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env["PYTHONWARNINGS"] = "ignore"
    python = [sys.executable, "-m", "askexpert"]
    partition = folder.parent / "partition.json"
    if not partition.is_file():
        command = [*python, "partition", "--method", "superclass", "--out", str(partition)]
        subprocess.run([*command, "--data.synthetic_train_per_class", "10"], env=env, check=True, capture_output=True)
    for name, extra in runs(folder).items():
        command = [*python, "fit", *COMMON, *extra, f"--trainer.default_root_dir={folder / name}"]
        done = subprocess.run(command, env=env, cwd=folder.parent, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{checkout}: {name} failed:\n{done.stderr[-2000:]}")


def logged(path: Path) -> dict[str, list[tuple[str, float]]]:
    values: dict[str, list[tuple[str, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in ("", None) and key not in ("step", "epoch"):
                    values.setdefault(key, []).append((row["step"], float(value)))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="/tmp/askexpert_before")
    parser.add_argument("--after", default=str(ROOT))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metrics_before_after.json"))
    args = parser.parse_args()
    result: dict = {"before": args.before, "after": args.after, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {label: Path(tmp) / label for label in ("before", "after")}
        for label, folder in folders.items():
            folder.mkdir()
            run_all(Path(getattr(args, label)), folder)
        for name in runs(folders["after"]):
            before, after = (logged(folders[label] / name / "metrics.csv") for label in ("before", "after"))
            common = sorted(set(before) & set(after))
            worst, mismatched = 0.0, []
            for key in common:
                if [s for s, _ in before[key]] != [s for s, _ in after[key]]:
                    mismatched.append(key)
                    continue
                diff = max(abs(x - y) for (_, x), (_, y) in zip(before[key], after[key], strict=True))
                worst = max(worst, diff)
                if diff > 0:
                    mismatched.append(key)
            entry = {
                "compared": common,
                "values": sum(len(before[k]) for k in common),
                "max_abs_diff": worst,
                "different": mismatched,
                "only_before": sorted(set(before) - set(after)),
                "only_after": sorted(set(after) - set(before)),
            }
            result["runs"][name] = entry
            print(
                f"{name}: {entry['values']} values of {len(common)} metrics compared, max |diff| {worst:g}, "
                f"different: {mismatched or 'none'}; only before: {entry['only_before'] or 'none'}, "
                f"only after: {entry['only_after'] or 'none'}",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

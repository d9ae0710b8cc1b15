"""Framework overhead end to end: the pipeline's wall time vs the bare compute for the same samples.

Runs `python -m askexpert pipeline` (in this process) into a fresh folder, then counts what it computed:
per training stage the optimizer steps x batch size (from its last checkpoint) and the validation images
per epoch, plus one pass over val + test per model for the evaluation. The "bare" time of that work is
those image counts divided by the bare training step's and the plain forward pass's img/s for each model,
measured afterwards in the same process (benchmarks/train_throughput.py and benchmarks/inference.py).
Overhead = wall / bare - 1: process start, data generation, Lightning, checkpoints, metrics, reports.

    python benchmarks/pipeline_overhead.py                                    # the demo pipeline (~5 min)
    python benchmarks/pipeline_overhead.py --config configs/pipeline/demo.yaml --device cpu

Writes benchmarks/results/pipeline_overhead_<device>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from inference import throughput  # noqa: E402
from train_throughput import bare_step  # noqa: E402


def stage_work(run: Path) -> dict[str, dict]:
    """Per model name: training images, validation images and evaluation images the run computed."""
    work: dict[str, dict] = {}
    for ckpt in glob.glob(str(run / "**" / "checkpoints" / "last.ckpt"), recursive=True):
        stage = Path(ckpt).parents[1]
        config = yaml.safe_load((stage / "config.yaml").read_text())
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        name = config["model"]["init_args"]["model_name"]
        entry = work.setdefault(name, {"train": 0, "forward": 0, "batch": config["data"]["batch_size"]})
        entry["train"] += checkpoint["global_step"] * config["data"]["batch_size"]
        val = json.loads((run / "report.json").read_text())["data"]["val_size"]
        entry["forward"] += val * (checkpoint["epoch"] + 1)
    report = json.loads((run / "report.json").read_text())
    images = report["data"]["val_size"] + report["data"]["test_size"]
    models = [report["generalist"]["model_name"], report["base"]["model_name"]]
    models += [e["model_name"] for e in report["experts"] + report["static_experts"]]
    for name in models:
        work[name]["forward"] += images
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pipeline/demo.yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from askexpert.cli import cli_main

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        start = time.perf_counter()
        cli_main(["pipeline", "--config", args.config, "--out", str(run)])
        wall = time.perf_counter() - start
        work = stage_work(run)
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    bare_seconds, rows = 0.0, []
    for name, entry in work.items():
        train_rate = bare_step(name, args.device, entry["batch"], precision, steps=5, warmup=2, compile_=False)
        forward_rate = throughput(name, args.device, 512, repeats=3)
        seconds = entry["train"] / train_rate + entry["forward"] / forward_rate
        bare_seconds += seconds
        rows.append({**entry, "model": name, "bare_train_img_s": train_rate, "forward_img_s": forward_rate})
    result = {"config": args.config, "device": args.device, "wall_s": wall, "bare_s": bare_seconds}
    result.update(overhead=wall / bare_seconds - 1, models=rows)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"pipeline_overhead_{args.device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"pipeline {args.config}: {wall:.0f} s wall, {bare_seconds:.0f} s of bare compute: "
        f"overhead {100 * result['overhead']:.0f} % -> {out}"
    )


if __name__ == "__main__":
    main()

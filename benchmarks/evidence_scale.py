"""The accuracy/minutes curve behind configs/pipeline/cpu_evidence.yaml: candidate models on the full-size stand-in.

Each candidate is one `python -m askexpert fit` on the stand-in at CIFAR-100's full size (45 000 training images,
10 % validation) with batch 256, run as a user would, with its wall time. The curve is its validation accuracy
after every epoch (validation only: this chooses models, so test is never read) against the minutes spent.

    python benchmarks/evidence_scale.py                          # every candidate not measured yet (about an hour)
    python benchmarks/evidence_scale.py --only mini_p8 --epochs 20
    python benchmarks/evidence_scale.py --adopt mini_p8=/path/to/run   # a run made by hand with the same arguments

`--adopt` reads a finished run folder instead of training: its curve from metrics.csv, its wall time from the
folder's own file times (config.yaml written at the start, checkpoints/last.ckpt after the last epoch), which
miss the few seconds before the run folder exists. Each result says how it was timed and whether other work
shared the machine (`--shared-machine`), since 2 cores slow down a lot when two jobs use them.

Writes benchmarks/results/evidence_scale_cpu.json and evidence_scale_cpu.png (accuracy against minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "evidence_scale_cpu.json"
DATA = ["--config", "configs/data/synthetic.yaml", "--data.batch_size", "256", "--seed_everything", "0"]
CPU = ["--config", "configs/trainer/cpu.yaml"]
CANDIDATES = {
    # the generalist of cpu_evidence.yaml
    "micro_p8": ["--config", "configs/model/generalist_micro_p8.yaml"],
    # the base model of cpu_evidence.yaml
    "mini_p8": ["--config", "configs/model/base_mini_p8.yaml"],
    # the edge-size ViT of the demo: 3.3x the mini's FLOPs; bf16 (1.2x faster than fp32 at this width) and the
    # lower lr its width wants (docs/divergence.md)
    "edge_p8_bf16": [
        "--config",
        "configs/model/base_edge_p8.yaml",
        "--trainer.precision",
        "bf16-mixed",
        "--model.lr",
        "1e-3",
        "--model.warmup_epochs",
        "1",
    ],
}
DEFAULT_EPOCHS = {"micro_p8": 20, "mini_p8": 20, "edge_p8_bf16": 12}


def curve(folder: Path) -> list[float]:
    with open(folder / "metrics.csv", newline="") as handle:
        return [float(r["val/acc"]) for r in csv.DictReader(handle) if r.get("val/acc")]


def params(model_args: list[str]) -> int:
    import timm
    import yaml

    import askexpert.models  # noqa: F401

    config = yaml.safe_load((ROOT / model_args[1]).read_text())["model"]["init_args"]
    return sum(p.numel() for p in timm.create_model(config["model_name"], num_classes=100).parameters())


def measure(name: str, epochs: int, out: Path) -> dict:
    folder = out / name
    args = [sys.executable, "-m", "askexpert", "fit", *DATA, *CPU, *CANDIDATES[name]]
    args += ["--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(folder)]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return {"wall_s": time.perf_counter() - start, "timed_by": "this script", "folder": str(folder)}


def adopt(folder: Path) -> dict:
    start = (folder / "config.yaml").stat().st_mtime
    end = (folder / "checkpoints" / "last.ckpt").stat().st_mtime
    return {"wall_s": end - start, "timed_by": "the run folder's file times", "folder": str(folder)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, entry in results.items():
        per_epoch = entry["wall_s"] / 60 / len(entry["val_acc"])
        minutes = [per_epoch * (i + 1) for i in range(len(entry["val_acc"]))]
        label = f"{name} ({entry['params'] / 1e6:.2f} M params)"
        axis.plot(minutes, [100 * a for a in entry["val_acc"]], "o-", markersize=3, label=label)
    axis.set_xlabel("minutes of training on 2 CPU cores")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title("full-size stand-in (STAND-IN data, not CIFAR-100)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="these candidates (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs for every candidate run here (default: per candidate)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "evidence_scale"), help="run folders")
    parser.add_argument("--adopt", nargs="+", default=[], metavar="NAME=DIR", help="finished runs made by hand")
    parser.add_argument("--shared-machine", action="store_true", help="record that other work shared the cores")
    parser.add_argument("--result", default=str(RESULT))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = Path(args.result)
    saved = json.loads(result_path.read_text()) if result_path.is_file() else {"results": {}}
    if any("=" not in item for item in args.adopt):
        parser.error("--adopt takes NAME=DIR (a candidate's name and the finished run folder made with its arguments)")
    adopted = dict(item.split("=", 1) for item in args.adopt)
    for name in adopted:
        if name not in CANDIDATES:
            raise SystemExit(f"unknown candidate {name!r}; candidates: {', '.join(CANDIDATES)}")
    names = args.only or (list(adopted) if adopted else list(CANDIDATES))
    for name in names:
        if name in adopted:
            folder = Path(adopted[name])
            timing = adopt(folder)
        elif name in saved["results"]:
            print(f"{name}: measured before, kept ({result_path})")
            continue
        else:
            epochs = args.epochs or DEFAULT_EPOCHS[name]
            timing = measure(name, epochs, out)
            folder = Path(timing["folder"])
        accs = curve(folder)
        entry = {
            "fit_args": CANDIDATES[name],
            "params": params(CANDIDATES[name]),
            "epochs": len(accs),
            "val_acc": accs,
            "best_val_acc": max(accs),
            **timing,
            "minutes_per_epoch": timing["wall_s"] / 60 / len(accs),
            "shared_machine": args.shared_machine,
        }
        saved["results"][name] = entry
        print(
            f"{name}: {entry['epochs']} epochs, best val {100 * entry['best_val_acc']:.1f} %, "
            f"{timing['wall_s'] / 60:.1f} min ({entry['minutes_per_epoch']:.2f} min/epoch, {timing['timed_by']})"
        )
    saved.update(benchmark="evidence_scale", data="synthetic stand-in, 500 train / 100 test per class, batch 256")
    saved["environment"] = {"cpu_count": os.cpu_count()}
    result_path.write_text(json.dumps(saved, indent=2) + "\n")
    plot(saved["results"], result_path.with_suffix(".png"))
    print(f"wrote {result_path} and {result_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""Inference speed of each askexpert ViT: latency at batch 1 (what one routed image costs; the same
measurement `python -m askexpert profile` writes into device profiles) and throughput at a large batch
(what the evaluation's logits pass costs).

    python benchmarks/inference.py                  # CPU, fp32
    python benchmarks/inference.py --device cuda    # GPU, bf16 autocast for the throughput

Writes benchmarks/results/inference_<device>.json and prints one line per model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from askexpert.collab.costs import gflops_per_image  # noqa: E402
from askexpert.commands.profile import time_model  # noqa: E402
from askexpert.models import model_names  # noqa: E402


@torch.no_grad()
def throughput(name: str, device: str, batch: int, repeats: int) -> float:
    import timm

    model = timm.create_model(name, num_classes=100).eval().to(device)
    images = torch.rand(batch, 3, 32, 32, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
        for _ in range(2):
            model(images)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    models = args.models or (model_names() if device == "cuda" else [m for m in model_names() if "patch8" in m])
    batch = args.batch or (1024 if device == "cuda" else 256)
    rows = []
    for name in models:
        latency = time_model(name, 100, 32, device, min_run_time=1.0)
        rate = throughput(name, device, batch, repeats=20 if device == "cuda" else 3)
        rows.append({"model": name, "gflops": gflops_per_image(name, 100), "batch1_ms": latency, "img_s": rate})
        print(f"{name}: {latency:.2f} ms at batch 1, {rate:,.0f} img/s at batch {batch}", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"inference_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    report = {"device": machine, "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": batch}
    out.write_text(json.dumps({**report, "models": rows}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

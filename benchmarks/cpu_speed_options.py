"""Which CPU training options make a step faster: fp32 vs bf16 autocast vs torch.compile, as ratios in one run.

For each model, every option's bare training step (forward + backward + AdamW on one batch, as
`benchmarks/train_throughput.py` times it) is measured in interleaved rounds, so a machine that slows down
mid-run slows every option alike; the figure kept is each option's median over the rounds, and the ratio is
against fp32 eager of the same round. Compilation is done before the first round and not timed (its cost is
printed: it is paid once per fit).

    python benchmarks/cpu_speed_options.py                                  # the CPU evidence models
    python benchmarks/cpu_speed_options.py --models vit_edge_patch8_32 --batch 256 --rounds 5

Writes benchmarks/results/cpu_speed_options.json and prints one line per model and option.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from askexpert.files.atomic import write_json  # noqa: E402

OPTIONS = {  # name -> (autocast to bf16, torch.compile)
    "fp32": (False, False),
    "bf16": (True, False),
    "fp32+compile": (False, True),
    "bf16+compile": (True, True),
}


def make_step(model_name: str, batch: int, bf16: bool, compile_: bool):
    import timm

    import askexpert.models  # noqa: F401  (registers the 32-px ViTs)

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=100).train()
    if compile_:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 100, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_micro_patch8_32", "vit_mini_patch8_32"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per option and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_speed_options.json"))
    args = parser.parse_args()
    results = {}
    for model_name in args.models:
        steps, setup = {}, {}
        for option in args.options:
            bf16, compile_ = OPTIONS[option]
            start = time.perf_counter()
            steps[option] = make_step(model_name, args.batch, bf16, compile_)
            for _ in range(3):  # warm-up; compiles here
                steps[option]()
            setup[option] = time.perf_counter() - start
        per_round: dict[str, list[float]] = {option: [] for option in args.options}
        for _ in range(args.rounds):
            for option in args.options:
                per_round[option].append(args.batch * args.steps / timed(steps[option], args.steps))
        base = per_round.get("fp32")
        entry = {}
        for option, rates in per_round.items():
            ratios = [r / b for r, b in zip(rates, base, strict=True)] if base else []
            entry[option] = {
                "img_per_s": statistics.median(rates),
                "vs_fp32": statistics.median(ratios) if ratios else None,
                "rounds": rates,
                "setup_s": setup[option],
            }
            ratio = f"{entry[option]['vs_fp32']:.2f}x fp32" if ratios else ""
            print(
                f"{model_name:22s} {option:13s} {entry[option]['img_per_s']:8.0f} img/s  {ratio:11s} "
                f"(setup and warm-up {setup[option]:.1f} s)",
                flush=True,
            )
        results[model_name] = entry
    record = {
        "benchmark": "cpu_speed_options",
        "config": vars(args),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "bf16_cpu": torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        },
        "results": results,
    }
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

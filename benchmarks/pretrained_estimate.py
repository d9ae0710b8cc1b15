"""Expected H100 time of a pipeline config, ESTIMATED from FLOPs (no GPU run): the figures in the header of
configs/pipeline/cifar100_pretrained.yaml and in the README come from this script.

    python benchmarks/pretrained_estimate.py [--config configs/pipeline/cifar100_pretrained.yaml]

Per model: forward GFLOPs per image at the pipeline's image size (torch's FLOP counter, as the cost model
counts them), x3 for a training step, at the model-FLOP utilisation measured for ViTs of the same width in
../shared/benchmarks/anchors.md (H100, bf16, 64 tokens: tiny 7.1 %, small 23.4 %; more tokens should use the
GPU better, so this leans slow) of the measured 785 TFLOP/s bf16 peak. Wall time = compute x the ratio the
full-size stand-in pipeline showed on an H200 (about 12 minutes of wall time for about 3 of bare compute).
"""

from __future__ import annotations

import argparse
import os
import sys

import timm
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from askexpert.collab.costs import gflops_per_image  # noqa: E402

PEAK_TFLOPS = 785.0  # anchors.md: measured bf16 matmul peak of the H100
MFU_BY_WIDTH = {192: 0.071, 384: 0.234, 768: 0.337}  # anchors.md: tiny, small, base at 64 tokens
WALL_PER_COMPUTE = 4.0  # anchors.md: ~12 min wall for ~3 min bare compute (full-size stand-in pipeline, H200)
TRAIN_IMAGES = 45_000  # CIFAR-100's training split less the 10 % validation holdout
EVAL_IMAGES = 10_000 + 5_000  # test + validation, once per model


def stage_model(config_files: list[str]) -> str:
    name = None
    for path in config_files:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        name = ((loaded.get("model") or {}).get("init_args") or {}).get("model_name", name)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pipeline/cifar100_pretrained.yaml")
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as f:
        pipeline = yaml.safe_load(f)
    size = pipeline["data"]["image_size"]
    experts = pipeline["partition"]["num_experts"] * (2 if pipeline.get("static_baseline", True) else 1)
    total_s = 0.0
    print(f"{args.config}: {size} px, H100 bf16 ESTIMATE (no GPU run)")
    for stage, copies in (("generalist", 1), ("base", 1), ("experts", experts)):
        name = stage_model(pipeline[stage]["config"])
        epochs = pipeline[stage]["overrides"]["trainer.max_epochs"]
        width = timm.create_model(name, pretrained=False).num_features
        gflops = gflops_per_image(name, 100, size)
        mfu = MFU_BY_WIDTH[min(MFU_BY_WIDTH, key=lambda w: abs(w - width))]
        rate = PEAK_TFLOPS * 1e12 * mfu / (3 * gflops * 1e9)
        seconds = copies * (epochs * TRAIN_IMAGES / rate + EVAL_IMAGES / (3 * rate))
        total_s += seconds
        print(
            f"  {stage:10s} {copies} x {name}: {gflops:.2f} GFLOPs fwd/img, MFU {100 * mfu:.1f} % -> "
            f"{rate:,.0f} train img/s, {epochs} epochs: {seconds / 60:.1f} min"
        )
    wall_min = WALL_PER_COMPUTE * total_s / 60
    print(f"  bare compute {total_s / 60:.1f} min; wall (x{WALL_PER_COMPUTE:g}) ~{wall_min:.0f} min")


if __name__ == "__main__":
    main()

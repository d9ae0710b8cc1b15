"""What the fine-tuning input path costs next to the training step it feeds, and whether it waits for the device.

    python benchmarks/augment_speed.py [--device cuda] [--batch 128] [--image-size 224]

Times, on one batch of stored 32-px uint8 images on the device: crop + flip, RandAugment and TrivialAugment
(`datamodules/augment.py`), the model's resize + normalisation + random erasing, and one bf16 (CUDA) / fp32 (CPU)
training step of ViT-Tiny/16 at `--image-size`; each as a share of that step. On CUDA it also counts the
synchronising calls of each stage (`torch.cuda.set_sync_debug_mode`). Results: benchmarks/results/
augment_speed_<device>.json. Shared machines are noisy: read the shares, not the milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from askexpert.deploy.timing import time_calls  # noqa: E402
from askexpert.files.atomic import write_json  # noqa: E402
from askexpert.modules import GeneralistModule  # noqa: E402
from datamodules.augment import auto_augment, random_crop_flip  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of `fn()` after 2 warm-up calls (on CUDA each call waits for the device's work)."""
    if device != "cuda":
        return 1e3 * statistics.median(time_calls(fn, repeats, warmups=2))
    torch.cuda.synchronize()
    return 1e3 * statistics.median(time_calls(lambda: (fn(), torch.cuda.synchronize()), repeats, warmups=2))


def syncs(fn, device: str) -> int | None:
    """How many calls of `fn()` synchronise with the device (CUDA's sync debug mode warns once per sync)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (args.batch,), device=device)
    model = GeneralistModule(model_name="vit_tiny_patch16_224", image_size=args.image_size, random_erase=0.25)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model.net(model.training_inputs(images)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stages = {
        "crop_flip": lambda: random_crop_flip(images),
        "randaugment": lambda: auto_augment(images, "randaugment"),
        "trivialaugment": lambda: auto_augment(images, "trivialaugment"),
        "resize_normalise_erase": lambda: model.training_inputs(images),
        "train_step": step,
    }
    results = {name: {"ms": timed(fn, device, args.repeats), "syncs": syncs(fn, device)} for name, fn in stages.items()}
    step_ms = results["train_step"]["ms"]
    for name, result in results.items():
        result["share_of_step"] = result["ms"] / step_ms
        count = "" if result["syncs"] is None else f", {result['syncs']} syncs"
        print(f"{name:24s} {result['ms']:9.2f} ms  {100 * result['share_of_step']:6.1f} % of a step{count}")
    out = {"device": device, "batch": args.batch, "image_size": args.image_size, "threads": torch.get_num_threads()}
    path = f"benchmarks/results/augment_speed_{device}.json"
    write_json(path, {**out, "stages": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Does the synthetic CIFAR-100 stand-in behave the way the research needs?

Trains the small (edge) and the medium ViT on the stand-in at a few data sizes (images per class) and reads
their test accuracy after a few epoch counts, and reports for each:

* fine accuracy and superclass accuracy (the stand-in should make the superclass much easier than the class),
* the share of errors that stay inside the true superclass (chance is 4/(classes-1): ~4 % with 100 classes),
* whether and where the medium model overtakes the small one as data and epochs grow (the near-edge expert
  only makes sense if capacity pays off on this data).

Epoch counts are checkpoints of one cosine run per (model, size) that lasts the largest count, so a grid of
epochs costs no more than its longest run. This is a benchmark, not the framework: plain PyTorch loops
(AdamW, warm-up + cosine, label smoothing 0.1, batched random-crop-with-padding + flip augmentation).

CPU defaults (patch-8 models, 5 superclasses = 25 classes, small sizes, one thread) took 347 s on a 2-core
machine; `--device cuda` defaults to the patch-4 models on all 100 classes at larger sizes (sized for a few
minutes on one H100, not yet measured). Results go to `benchmarks/results/stand_in_hierarchy_<device>.json`.

    python benchmarks/stand_in_hierarchy.py [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import askexpert.models  # noqa: E402,F401  (registers the ViT variants with timm)
from askexpert.files.atomic import write_json  # noqa: E402
from datamodules.synthetic import fine_accuracy_ceiling, make_synthetic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# One intra-op thread on CPU: on a 2-core machine shared with other jobs, 2-thread OpenMP ops were measured
# ~15x slower (10 vs 169 images/s for the edge ViT) whenever another process held a core. On an idle
# machine `--threads 2` is faster.
DEFAULT_THREADS = {"cpu": 1, "cuda": None}
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
# Per device: (small model, medium model, superclasses used, images per class, epoch checkpoints, test/class,
# batch size). CPU sizes are what fits ~6 minutes: the medium patch-8 ViT trains at only ~30-40 images/s there.
DEFAULTS = {
    "cpu": ("vit_edge_patch8_32", "vit_medium_patch8_32", 5, [30, 90], [1, 3], 40, 32),
    "cuda": ("vit_edge_patch4_32", "vit_medium_patch4_32", 20, [100, 500], [15, 40], 200, 128),
}


@dataclass
class Data:
    """Train/test tensors of the classes in use, labels remapped to 0..C-1, with their superclass ids."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_to_superclass: torch.Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, help="JSON result path (default: results/stand_in_hierarchy_<device>.json)")
    parser.add_argument("--models", nargs="+", help="timm names, smallest first (default: edge and medium)")
    parser.add_argument("--superclasses", type=int, help="use the first N superclasses (5 classes each)")
    parser.add_argument("--sizes", type=int, nargs="+", help="training images per class")
    parser.add_argument("--epochs", type=int, nargs="+", help="epoch counts at which to evaluate")
    parser.add_argument("--test-per-class", type=int, help="test images per class")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (scaled by batch/128)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, see DEFAULT_THREADS)")
    args = parser.parse_args(argv)
    small, medium, supers, sizes, epochs, test_per_class, batch = DEFAULTS[args.device]
    args.out = args.out or RESULTS / f"stand_in_hierarchy_{args.device}.json"
    args.models = args.models or [small, medium]
    args.superclasses = args.superclasses or supers
    args.sizes = sorted(args.sizes or sizes)
    args.epochs = sorted(args.epochs or epochs)
    args.test_per_class = args.test_per_class or test_per_class
    args.batch_size = args.batch_size or batch
    args.threads = args.threads or DEFAULT_THREADS[args.device]
    if not 1 <= args.superclasses <= 20:
        parser.error("--superclasses must be between 1 and 20")
    return args


def load_data(max_size: int, test_per_class: int, superclasses: int, seed: int, device: str) -> Data:
    """Generate the stand-in once at the largest size; smaller sizes are prefixes (rows are image-major)."""
    splits = make_synthetic(train_per_class=max_size, test_per_class=test_per_class, seed=seed)
    coarse = torch.tensor(splits.class_to_superclass)
    keep = torch.nonzero(coarse < superclasses).flatten()  # fine ids in use, in CIFAR order
    remap = torch.full((len(coarse),), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))

    def subset(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = remap[labels] >= 0
        return images[mask].to(device), remap[labels[mask]].to(device)

    train_images, train_labels = subset(splits.train_images, splits.train_labels)
    test_images, test_labels = subset(splits.test_images, splits.test_labels)
    return Data(train_images, train_labels, test_images, test_labels, coarse[keep].to(device))


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop from a zero-padded copy plus random horizontal flip, for a whole batch at once."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=gen, device=gen.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=gen, device=gen.device)
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
    flip = torch.rand(n, 1, 1, generator=gen, device=gen.device) < 0.5
    cols = torch.where(flip, dx + (w - 1) - torch.arange(w, device=images.device).view(1, 1, w), cols)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data, batch_size: int = 500) -> dict[str, float]:
    """Fine accuracy, superclass accuracy and the share of wrong predictions inside the true superclass."""
    model.eval()
    preds = torch.cat(
        [
            model(normalise(data.test_images[i : i + batch_size])).argmax(1)
            for i in range(0, len(data.test_images), batch_size)
        ]
    )
    model.train()
    truth = data.test_labels
    same_super = data.class_to_superclass[preds] == data.class_to_superclass[truth]
    wrong = preds != truth
    return {
        "fine_acc": (~wrong).float().mean().item(),
        "superclass_acc": same_super.float().mean().item(),
        "within_superclass_error_share": same_super[wrong].float().mean().item() if wrong.any() else 1.0,
    }


def train(model_name: str, data: Data, size: int, args: argparse.Namespace) -> list[dict]:
    """Train one model on the first `size` images per class; evaluate at every epoch checkpoint."""
    num_classes = len(data.class_to_superclass)
    images, labels = data.train_images[: size * num_classes], data.train_labels[: size * num_classes]
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    model = timm.create_model(model_name, num_classes=num_classes).to(args.device)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    total = steps_per_epoch * args.epochs[-1]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr * args.batch_size / 128, weight_decay=args.weight_decay)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    results, start = [], time.perf_counter()
    for epoch in range(1, args.epochs[-1] + 1):
        order = torch.randperm(len(images), generator=gen, device=args.device)
        for i in range(0, len(images), args.batch_size):
            idx = order[i : i + args.batch_size]
            with autocast:
                logits = model(normalise(augment(images[idx], gen)))
            loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if epoch in args.epochs:
            with autocast:
                metrics = evaluate(model, data)
            row = {
                "model": model_name,
                "per_class": size,
                "epochs": epoch,
                "train_seconds": round(time.perf_counter() - start, 1),
                "final_loss": round(loss.item(), 3),
                **{k: round(v, 4) for k, v in metrics.items()},
            }
            print(
                f"  {model_name:22s} size {size:4d} epoch {epoch:3d}: fine {row['fine_acc']:.3f} "
                f"super {row['superclass_acc']:.3f} within {row['within_superclass_error_share']:.3f} "
                f"({row['train_seconds']:.0f}s)",
                flush=True,
            )
            results.append(row)
    return results


def summarise(results: list[dict], models: list[str], test_images: int) -> dict:
    """Where the largest model beats the smallest by more than two binomial standard errors."""
    small, large = models[0], models[-1]
    by_key = {(r["model"], r["per_class"], r["epochs"]): r for r in results}
    cells, overtakes = [], []
    for (model, size, epochs), row in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if model != large or (small, size, epochs) not in by_key:
            continue
        base = by_key[(small, size, epochs)]["fine_acc"]
        p = (base + row["fine_acc"]) / 2
        margin = 2 * math.sqrt(2 * p * (1 - p) / test_images)
        gain = row["fine_acc"] - base
        cells.append({"per_class": size, "epochs": epochs, "gain": round(gain, 4), "margin": round(margin, 4)})
        if gain > margin:
            overtakes.append({"per_class": size, "epochs": epochs})
    return {
        "small": small,
        "large": large,
        "cells": cells,
        "large_overtakes_small": bool(overtakes),
        "overtakes_at": overtakes,
        "first_overtake": overtakes[0] if overtakes else None,
    }


def _display_path(path: Path) -> str:
    """Repository-relative where possible, so the committed JSON does not record one machine's checkout."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(argv: list[str] | None = None) -> dict:
    """Run the whole benchmark; returns (and writes) the JSON-ready result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_data(args.sizes[-1], args.test_per_class, args.superclasses, args.seed, args.device)
    gen_seconds = time.perf_counter() - t0
    num_classes = len(data.class_to_superclass)
    print(
        f"stand-in: {num_classes} classes, sizes {args.sizes}/class, test {len(data.test_images)} images, "
        f"generated in {gen_seconds:.1f}s; models {args.models}; epochs {args.epochs}",
        flush=True,
    )
    results = []
    for size in args.sizes:
        for model_name in args.models:
            results.extend(train(model_name, data, size, args))
    summary = summarise(results, args.models, len(data.test_images))
    out = {
        "benchmark": "stand_in_hierarchy",
        "config": {k: (_display_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "classes": num_classes,
        "chance": {
            "fine_acc": 1 / num_classes,
            "superclass_acc": 1 / args.superclasses,
            "within_superclass_error_share": 4 / (num_classes - 1) if num_classes > 1 else 0.0,
        },
        "fine_accuracy_ceiling": round(fine_accuracy_ceiling(), 4),
        "generation_seconds": round(gen_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
        "summary": summary,
    }
    write_json(args.out, out)
    best = max(results, key=lambda r: r["fine_acc"])
    where = summary["first_overtake"]
    print(
        f"SUMMARY classes={num_classes} best fine={best['fine_acc']:.3f} ({best['model']}, "
        f"{best['per_class']}/class, {best['epochs']} ep) super={best['superclass_acc']:.3f} "
        f"within={best['within_superclass_error_share']:.3f} ceiling={out['fine_accuracy_ceiling']:.3f} "
        f"overtake={'at ' + str(where) if where else 'no'} total={out['total_seconds']:.0f}s -> {args.out}"
    )
    return out


if __name__ == "__main__":
    run()

"""Training throughput: our full training step vs the bare model step vs a torchvision-style data path.

For each model it measures, in one process (compare the ratios, not absolute numbers across machines):
* bare step: forward + backward + AdamW (fused on CUDA) on one batch already on the device, in the chosen
  precision - the ceiling for this model on this machine;
* full step: `Trainer.fit` with askexpert's ImageDataModule and GeneralistModule, exactly as users train
  (data loading, on-device augmentation, metrics, logging, LR schedule), timed by a callback after a
  warm-up, without validation or checkpointing;
* reference loader: a torchvision-style DataLoader (PIL images, RandomCrop(pad 4) + flip + ToTensor +
  Normalize per sample, `--workers` processes), loading only: what such a data path could deliver at most;
and the MFU of both steps: 3 x forward FLOPs per image x img/s over a measured peak (a large matmul in
the same precision on the same device).

    python benchmarks/train_throughput.py                      # CPU: patch-8 models, fp32, small batches
    python benchmarks/train_throughput.py --device cuda        # GPU: patch-4 models, bf16, batch 512

Writes benchmarks/results/train_throughput_<device>.json and prints one summary line per model.
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

DEFAULTS = {
    "cpu": {"models": ["vit_edge_patch8_32", "vit_medium_patch8_32"], "batch": 128, "precision": "32-true"},
    "cuda": {"models": ["vit_edge_patch4_32", "vit_medium_patch4_32"], "batch": 512, "precision": "bf16-mixed"},
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return torch.autocast(device_type=device, enabled=False)


def peak_tflops(device: str, precision: str) -> float:
    """Measured matmul rate in the training precision (the MFU denominator)."""
    n = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if precision.startswith("bf16") and device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):  # the best of several: a peak, not an average of a noisy machine
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def bare_step(model_name: str, device: str, batch: int, precision: str, steps: int, warmup: int, compile_: bool):
    import timm

    import askexpert.models  # noqa: F401

    model = timm.create_model(model_name, num_classes=100).to(device).train()
    if compile_:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    mean = torch.tensor([0.5, 0.5, 0.5], device=device).view(1, 3, 1, 1)

    def step():
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model((images.float() / 255 - mean) / 0.25), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def full_step(model_name: str, device: str, batch: int, precision: str, steps: int, warmup: int, compile_: bool):
    import lightning.pytorch as pl

    from askexpert.modules import GeneralistModule
    from datamodules.datamodule import ImageDataModule

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch_, index):
            if index == warmup:
                sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch_, index):
            if index == warmup + steps - 1:
                sync(device)
                self.seconds = time.perf_counter() - self.start

    per_class = max(10, -(-batch * (warmup + steps) // 90))  # enough training images for the steps
    data = ImageDataModule(
        source="synthetic", synthetic_train_per_class=per_class, synthetic_test_per_class=1, batch_size=batch
    )
    # same network as the bare step (no stochastic depth); everything else is the users' recipe
    module = GeneralistModule(
        model_name=model_name, num_classes=100, warmup_epochs=0.1, drop_path_rate=0.0, compile=compile_
    )
    timer = Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return batch * steps / timer.seconds


def reference_loader(batch: int, workers: int, batches: int) -> float:
    """A torchvision-style data path: PIL images and per-sample transforms in worker processes."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from datamodules.synthetic import make_synthetic

    splits = make_synthetic(train_per_class=max(10, -(-batch * batches // 100)), test_per_class=1)
    pil = transforms.ToPILImage()
    images = [pil(image) for image in splits.train_images]
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
        ]
    )

    class PILDataset(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(images[i]), int(splits.train_labels[i])

    loader = DataLoader(PILDataset(), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    iterator = iter(loader)
    next(iterator)  # workers started
    start = time.perf_counter()
    count = 0
    for _ in range(batches - 1):
        count += len(next(iterator)[1])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="reference loader workers")
    parser.add_argument("--compile", action="store_true", help="torch.compile both steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    defaults = DEFAULTS[device]
    models = args.models or defaults["models"]
    batch = args.batch or defaults["batch"]
    precision = args.precision or defaults["precision"]
    steps = args.steps or (50 if device == "cuda" else 20)
    warmup = args.warmup or (10 if device == "cuda" else 3)
    workers = args.workers or ([4, 15] if device == "cuda" else [2])
    torch.manual_seed(0)

    peak = peak_tflops(device, precision)
    results = []
    for name in models:
        flops = 3 * gflops_per_image(name, 100) * 1e9  # forward + backward ~ 3x forward
        # bare, full, bare again: on a shared machine the speed drifts; the better bare run is the ceiling
        bare = bare_step(name, device, batch, precision, steps, warmup, args.compile)
        full = full_step(name, device, batch, precision, steps, warmup, args.compile)
        bare = max(bare, bare_step(name, device, batch, precision, steps, warmup, args.compile))
        row = {
            "model": name,
            "bare_img_s": bare,
            "full_img_s": full,
            "full_over_bare": full / bare,
            "bare_mfu": flops * bare / (peak * 1e12),
            "full_mfu": flops * full / (peak * 1e12),
        }
        results.append(row)
        print(
            f"{name}: full step {full:,.0f} img/s = {100 * full / bare:.1f} % of the bare step ({bare:,.0f} img/s); "
            f"MFU {100 * row['full_mfu']:.1f} % (peak {peak:.1f} TFLOP/s)",
            flush=True,
        )
    loaders = {str(w): reference_loader(batch, w, 20 if device == "cuda" else 6) for w in workers}
    for w, rate in loaders.items():
        ratios = ", ".join(f"{r['model']} full step {r['full_img_s'] / rate:.2f}x" for r in results)
        print(f"reference PIL loader, {w} workers: {rate:,.0f} img/s ({ratios})", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"train_throughput_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "compile": args.compile,
        "peak_tflops": peak,
        "models": results,
        "reference_loader_img_s": loaders,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

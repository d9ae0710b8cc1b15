"""Training throughput: our full training step vs the bare model step vs a torchvision-style data path.

For each model it measures, in one process (compare the ratios, not absolute numbers across machines):
* bare step: forward + backward + AdamW (fused on CUDA) on one batch already on the device, in the chosen
  precision - the ceiling for this model on this machine;
* full step: `Trainer.fit` with askexpert's ImageDataModule and GeneralistModule, exactly as users train
  (data loading, on-device augmentation, metrics, logging, LR schedule; on CUDA also the GPU configs'
  gradient clipping at norm 1.0), timed by a callback after a
  warm-up, without validation or checkpointing;
* reference loader: a torchvision-style DataLoader (PIL images, RandomCrop(pad 4) + flip + ToTensor +
  Normalize per sample, `--workers` processes), loading only: what such a data path could deliver at most;
and the MFU of both steps: 3 x forward FLOPs per image x img/s over a measured peak (a large matmul in
the same precision on the same device).

    python benchmarks/train_throughput.py                      # CPU: patch-8 models, fp32, small batches
    python benchmarks/train_throughput.py --device cuda        # GPU: patch-4 models, bf16, batch 512

Per-step framework overhead (`overhead` in the JSON): for one model at a small batch (CPU: the micro model at
batch 32), milliseconds per step of the bare step, of the full step as above (no progress bar, no logger)
and of the full step as users run it: the Trainer the CLI builds (`fit` defaults: CSV logger, progress bar,
checkpoint callbacks, the CLI's own callbacks), median of `--repeats` interleaved repeats; overhead = full
minus bare. On a GPU it also runs a few steps under `torch.cuda.set_sync_debug_mode("warn")` and counts
the synchronising calls per step (0 means the CPU can run ahead of the GPU).

    python benchmarks/train_throughput.py --overhead-only              # the CPU overhead figures only
    python benchmarks/train_throughput.py --overhead-only --checkout /tmp/askexpert_before   # another checkout

`--checkout` measures the askexpert code of another checkout (put first on `sys.path`; the JSON records
which files were imported); `benchmarks/overhead_before_after.py` alternates two checkouts.

Writes benchmarks/results/train_throughput_<device>.json and prints one summary line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

DEFAULTS = {
    "cpu": {"models": ["vit_edge_patch8_32", "vit_medium_patch8_32"], "batch": 128, "precision": "32-true"},
    "cuda": {"models": ["vit_edge_patch4_32", "vit_medium_patch4_32"], "batch": 512, "precision": "bf16-mixed"},
}
# the per-step overhead measurement: a small model at a small batch, so the framework's share shows
OVERHEAD_DEFAULTS = {"cpu": ("vit_micro_patch8_32", 32), "cuda": ("vit_edge_patch4_32", 512)}


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


def bare_step(
    model_name: str,
    device: str,
    batch: int,
    precision: str,
    steps: int,
    warmup: int,
    compile_: bool,
    per_step: list[tuple[float, float]] | None = None,
) -> float:
    """img/s of forward + backward + AdamW on one batch already on the device. `per_step` receives each
    timed step's (wall seconds, process CPU seconds) (on a GPU both only say when the host was done)."""
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
    previous = (start, time.process_time())
    for _ in range(steps):
        step()
        if per_step is not None:
            now = (time.perf_counter(), time.process_time())
            per_step.append((now[0] - previous[0], now[1] - previous[1]))
            previous = now
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def _timer(device: str, warmup: int, steps: int):
    """A callback timing training batches warmup .. warmup + steps - 1 (synchronised at both ends)."""
    import lightning.pytorch as pl

    class Timer(pl.Callback):
        seconds = float("nan")

        def __init__(self) -> None:
            # (wall, process CPU) clocks at each timed batch's start, then at the end of the last one
            self.starts: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer, module, batch_, index):
            if index == warmup:
                sync(device)
                self.start = time.perf_counter()
            if warmup <= index < warmup + steps:
                self.starts.append((time.perf_counter(), time.process_time()))

        def on_train_batch_end(self, trainer, module, outputs, batch_, index):
            if index == warmup + steps - 1:
                sync(device)
                self.seconds = time.perf_counter() - self.start
                self.starts.append((time.perf_counter(), time.process_time()))

        def step_seconds(self) -> list[tuple[float, float]]:
            """(wall, CPU) seconds from a batch's start to the next one's: a step with everything Lightning does
            around it (fetch, transfer hook, logging, callbacks)."""
            pairs = zip(self.starts[:-1], self.starts[1:], strict=True)
            return [(b[0] - a[0], b[1] - a[1]) for a, b in pairs]

        def on_train_end(self, trainer, module):
            if self.seconds != self.seconds:  # NaN: the epoch was shorter than the timed steps
                raise RuntimeError(f"the run ended before {warmup + steps} training batches")

    return Timer()


def _sync_counter(first: int, count: int):
    """A callback counting CUDA synchronisations (torch's sync debug mode, "warn") over training batches
    first .. first + count - 1, from each batch's start to the next one's (data fetch included)."""
    import lightning.pytorch as pl

    class SyncCounter(pl.Callback):
        def __init__(self) -> None:
            self.caught: list = []
            self._context = None
            self.per_step: list[int] = []

        def on_train_batch_start(self, trainer, module, batch_, index):
            if index == first:
                self._context = warnings.catch_warnings(record=True)
                self.caught = self._context.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            elif first < index <= first + count and self._context is not None:
                found = sum(1 for w in self.caught if "synchroniz" in str(w.message))
                self.per_step.append(found - sum(self.per_step))
                if index == first + count:
                    self.stop()

        def stop(self) -> None:
            if self._context is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._context.__exit__(None, None, None)
                self._context = None

        def on_train_end(self, trainer, module):
            self.stop()

        def report(self) -> dict:
            syncs = [w for w in self.caught if "synchroniz" in str(w.message)]
            places: dict[str, int] = {}
            for w in syncs:
                where = f"{os.path.relpath(w.filename, ROOT) if w.filename.startswith(str(ROOT)) else w.filename}"
                places[f"{where}:{w.lineno}"] = places.get(f"{where}:{w.lineno}", 0) + 1
            return {
                "steps": len(self.per_step),
                "syncs_per_step": self.per_step,
                "syncs_total": len(syncs),
                "where": dict(sorted(places.items(), key=lambda kv: -kv[1])[:12]),
            }

    return SyncCounter()


def full_step(
    model_name: str,
    device: str,
    batch: int,
    precision: str,
    steps: int,
    warmup: int,
    compile_: bool,
    sync_steps: int = 0,
    details: dict | None = None,
):
    """img/s of `Trainer.fit` with our DataModule and module, no progress bar, no logger (the issue's
    "full step"). With `sync_steps` on CUDA, `details["syncs"]` counts synchronisations per step after the
    timed steps."""
    import lightning.pytorch as pl

    from askexpert.modules import GeneralistModule
    from datamodules.datamodule import ImageDataModule

    total = warmup + steps + (sync_steps + 1 if sync_steps else 0)
    # enough training images for the steps after the validation holdout (10 %, at least 1 per class, rounded)
    per_class = max(10, -(-batch * total // 85) + 1)
    data = ImageDataModule(
        source="synthetic", synthetic_train_per_class=per_class, synthetic_test_per_class=1, batch_size=batch
    )
    # same network as the bare step (no stochastic depth); everything else is the users' recipe
    module = GeneralistModule(
        model_name=model_name, num_classes=100, warmup_epochs=0.1, drop_path_rate=0.0, compile=compile_
    )
    timer = _timer(device, warmup, steps)
    callbacks = [timer]
    counter = _sync_counter(warmup + steps, sync_steps) if sync_steps and device == "cuda" else None
    if counter is not None:
        callbacks.append(counter)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
        gradient_clip_val=1.0 if device == "cuda" else None,  # the GPU recipe clips (configs/trainer/gpu.yaml)
    )
    trainer.fit(module, datamodule=data)
    if details is not None:
        details["step_seconds"] = timer.step_seconds()
        if counter is not None:
            details["syncs"] = counter.report()
    return batch * steps / timer.seconds


def cli_step(
    model_name: str,
    device: str,
    batch: int,
    precision: str,
    steps: int,
    warmup: int,
    sync_steps: int = 0,
    details: dict | None = None,
) -> float:
    """img/s of the full step as users run it: the model, data and Trainer that `python -m askexpert fit`
    builds (its defaults: CSV logger in the run folder, progress bar, checkpoint callbacks and whatever else
    the CLI installs), with no validation split; timed like `full_step`. `details` receives what was used."""
    from lightning.pytorch.callbacks import ProgressBar

    try:
        from askexpert.lightning_cli.cli import AskExpertCLI
    except ImportError:  # a checkout from before 2026-12 (`--checkout`, overhead_before_after.py)
        from askexpert.cli import AskExpertCLI

    total = warmup + steps + (sync_steps + 1 if sync_steps else 0)
    per_class = max(10, -(-batch * total // 100))
    with tempfile.TemporaryDirectory() as root:
        args = [
            "--model=askexpert.modules.GeneralistModule",
            f"--model.model_name={model_name}",
            "--model.warmup_epochs=0.1",
            "--model.drop_path_rate=0.0",
            "--data.source=synthetic",
            f"--data.synthetic_train_per_class={per_class}",
            "--data.synthetic_test_per_class=1",
            "--data.val_fraction=0",
            f"--data.batch_size={batch}",
            f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            "--trainer.devices=1",
            f"--trainer.precision={precision}",
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={total}",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
            *(["--trainer.gradient_clip_val=1.0"] if device == "cuda" else []),  # as configs/trainer/gpu.yaml
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = AskExpertCLI(args=args, run=False)
        trainer = cli.trainer
        bars = [i for i, c in enumerate(trainer.callbacks) if isinstance(c, ProgressBar)]
        bar = type(trainer.callbacks[bars[0]]).__name__ if bars else None
        interval_bar = checkout_progress_bar()
        if interval_bar is not None and bars and not isinstance(trainer.callbacks[bars[0]], interval_bar):
            trainer.callbacks[bars[0]] = interval_bar()
            bar = f"IntervalProgressBar (in place of the CLI's {bar})"
        timer = _timer(device, warmup, steps)
        trainer.callbacks.append(timer)
        counter = _sync_counter(warmup + steps, sync_steps) if sync_steps and device == "cuda" else None
        if counter is not None:
            trainer.callbacks.append(counter)
        trainer.fit(cli.model, datamodule=cli.datamodule)
    if details is not None:
        details["step_seconds"] = timer.step_seconds()
        details.update(progress_bar=bar, callbacks=sorted({type(c).__name__ for c in trainer.callbacks}))
        details.update(loggers=[type(x).__name__ for x in trainer.loggers], log_every_n_steps=trainer.log_every_n_steps)
        if counter is not None:
            details["syncs"] = counter.report()
    return batch * steps / timer.seconds


def checkout_progress_bar():
    """The measured checkout's own sync-free progress bar class (askexpert/callbacks/progress.py, before
    2026-12 askexpert/progress.py), or None where it has none (the editable install would otherwise find this
    checkout's module for an older one)."""
    import importlib

    import askexpert

    package = Path(askexpert.__file__).parent
    for name in ("askexpert.callbacks.progress", "askexpert.progress"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if package in Path(module.__file__).parents:
            return module.IntervalProgressBar
    return None


def overhead(device: str, model: str, batch: int, precision: str, steps: int, warmup: int, repeats: int) -> dict:
    """Per-step milliseconds of the bare step, the full step (no bar, no logger) and the users' full step
    (CLI), interleaved `repeats` times; medians, and full minus bare (the framework's overhead).

    Two clocks per step: wall time and this process's CPU time. On a shared CPU the CPU time is the robust
    figure (another process's burst steals wall time, not CPU time, and nothing here runs asynchronously);
    a repeat's figure is the median of its steps. On a GPU, where steps overlap, wall time is the mean over
    the timed steps (synchronised at both ends) and CPU time says how much host work a step needs."""
    names = ("bare", "full", "cli")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    details: dict = {}

    def add(name: str, rate: float, seconds: list[tuple[float, float]]) -> None:
        on_cpu = device == "cpu" and seconds
        wall[name].append(1e3 * statistics.median(w for w, _ in seconds) if on_cpu else 1e3 * batch / rate)
        cpu[name].append(1e3 * statistics.median(c for _, c in seconds) if seconds else float("nan"))

    for r in range(repeats):
        sync_steps = 10 if device == "cuda" and r == repeats - 1 else 0  # counted once, after the timed steps
        bare_seconds: list[tuple[float, float]] = []
        add("bare", bare_step(model, device, batch, precision, steps, warmup, False, bare_seconds), bare_seconds)
        full_details: dict = {}
        rate = full_step(model, device, batch, precision, steps, warmup, False, sync_steps, full_details)
        add("full", rate, full_details["step_seconds"])
        rate = cli_step(model, device, batch, precision, steps, warmup, sync_steps, details)
        add("cli", rate, details.pop("step_seconds"))
        if "syncs" in full_details:
            details["syncs_full_step"] = full_details["syncs"]
    med = {n: statistics.median(wall[n]) for n in names}
    med_cpu = {n: statistics.median(cpu[n]) for n in names}
    return {
        "model": model,
        "batch": batch,
        "precision": precision,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        **{f"{n}_ms": med[n] for n in names},
        **{f"{n}_cpu_ms": med_cpu[n] for n in names},
        "overhead_full_ms": med["full"] - med["bare"],
        "overhead_cli_ms": med["cli"] - med["bare"],
        "overhead_full_cpu_ms": med_cpu["full"] - med_cpu["bare"],
        "overhead_cli_cpu_ms": med_cpu["cli"] - med_cpu["bare"],
        "runs_ms": wall,
        "runs_cpu_ms": cpu,
        "cli": details,
    }


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


def use_checkout(path: str | None) -> dict:
    """Import askexpert, datamodules and strategies from `path` (first on sys.path; the editable install's
    finder comes after sys.path) and say which files were imported."""
    if path:
        sys.path.insert(0, str(Path(path).resolve()))
    import askexpert
    import datamodules
    import strategies

    return {
        name: str(Path(m.__file__).parent)
        for name, m in (("askexpert", askexpert), ("datamodules", datamodules), ("strategies", strategies))
    }


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
    parser.add_argument("--no-loader", action="store_true", help="skip the reference PIL loader")
    parser.add_argument("--overhead-only", action="store_true", help="only the per-step overhead figures")
    parser.add_argument("--no-overhead", action="store_true", help="skip the per-step overhead figures")
    parser.add_argument("--overhead-model", default=None, help="model of the overhead figures")
    parser.add_argument("--overhead-batch", type=int, default=None, help="batch of the overhead figures")
    parser.add_argument("--overhead-steps", type=int, default=None, help="timed steps per overhead repeat")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats of the overhead figures")
    parser.add_argument("--checkout", default=None, help="measure the askexpert code of this checkout")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; on a shared CPU, 1 keeps the per-step figures stable)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    imported = use_checkout(args.checkout)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    defaults = DEFAULTS[device]
    models = args.models or defaults["models"]
    batch = args.batch or defaults["batch"]
    precision = args.precision or defaults["precision"]
    steps = args.steps or (50 if device == "cuda" else 20)
    warmup = args.warmup or (10 if device == "cuda" else 3)
    workers = args.workers or ([4, 15] if device == "cuda" else [2])
    torch.manual_seed(0)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "imported": imported,
    }

    if not args.overhead_only:
        from askexpert.collab.costs import gflops_per_image

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
                f"{name}: full step {full:,.0f} img/s = {100 * full / bare:.1f} % of the bare step "
                f"({bare:,.0f} img/s); MFU {100 * row['full_mfu']:.1f} % (peak {peak:.1f} TFLOP/s)",
                flush=True,
            )
        loaders = (
            {}
            if args.no_loader
            else {str(w): reference_loader(batch, w, 20 if device == "cuda" else 6) for w in workers}
        )
        for w, rate in loaders.items():
            ratios = ", ".join(f"{r['model']} full step {r['full_img_s'] / rate:.2f}x" for r in results)
            print(f"reference PIL loader, {w} workers: {rate:,.0f} img/s ({ratios})", flush=True)
        report.update(precision=precision, batch=batch, steps=steps, warmup=warmup, compile=args.compile)
        report.update(peak_tflops=peak, models=results, reference_loader_img_s=loaders)

    if not args.no_overhead:
        model, small = OVERHEAD_DEFAULTS[device]
        model, small = args.overhead_model or model, args.overhead_batch or small
        o_steps = args.overhead_steps or (50 if device == "cuda" else 30)
        repeats = args.repeats or (3 if device == "cuda" else 5)
        row = overhead(device, model, small, precision, o_steps, 5, repeats)
        report["overhead"] = row
        print(
            f"overhead {model} batch {small} (median of {repeats}; CLI: {row['cli'].get('progress_bar')}, "
            f"{', '.join(row['cli'].get('loggers', []))}):\n"
            f"  wall ms/step: bare {row['bare_ms']:.2f}, full (no bar, no logger) {row['full_ms']:.2f} "
            f"(+{row['overhead_full_ms']:.2f}), as users run it {row['cli_ms']:.2f} (+{row['overhead_cli_ms']:.2f})\n"
            f"  CPU ms/step:  bare {row['bare_cpu_ms']:.2f}, full {row['full_cpu_ms']:.2f} "
            f"(+{row['overhead_full_cpu_ms']:.2f}), as users run it {row['cli_cpu_ms']:.2f} "
            f"(+{row['overhead_cli_cpu_ms']:.2f})",
            flush=True,
        )
        for what in ("syncs_full_step", "syncs"):
            if what in row["cli"]:
                syncs = row["cli"][what]
                print(f"  CUDA syncs per step ({what}): {syncs['syncs_per_step']} at {syncs['where']}", flush=True)

    name = f"train_throughput_{device}" + ("_overhead" if args.overhead_only else "") + ".json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

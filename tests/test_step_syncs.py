"""Training steps never make the host wait for the GPU: at most one sync per logging interval.

There is no GPU here, and on a CPU nothing waits, so the test watches for the operations that would wait on
a GPU. A `TorchDispatchMode` sees every aten operation of a real `fit` (through the CLI, with its progress
bar, CSV logger and callbacks) and flags those that read a device value back to the host: `.item()` /
`bool()` / `int()` / `float()` (`_local_scalar_dense`), `nonzero`, `unique`, `bincount`, `masked_select`,
boolean-mask indexing and assignment, `repeat_interleave` without a size, and `isin` where it sorts (large
test sets); `.tolist()` and `.numpy()` are patched in Python. Batches are fetched with the watch paused
(the samplers work on the host by design), so what is counted is the step itself: transfer hook,
augmentation, forward, loss, backward, optimizer, scheduler, callbacks, logging, progress bar.

Not visible on a CPU: blocking host->device copies (a host index for a GPU tensor, `torch.tensor(x,
device=cuda)`); `benchmarks/train_throughput.py --device cuda` counts those with
`torch.cuda.set_sync_debug_mode("warn")`.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data.dataloader import _BaseDataLoaderIter

from askexpert.callbacks.progress import IntervalProgressBar
from askexpert.cli import cli_main
from askexpert.lightning_cli.cli import AskExpertCLI

REPO = Path(__file__).resolve().parent.parent
INTERVAL = 5  # log_every_n_steps: "every step" and "every interval" differ by 5x
WARMUP = 3  # steps before the count starts
STEPS = 18  # training steps of each run: 14 counted (the last one ends the epoch), 3 intervals
aten = torch.ops.aten
UNIQUE_OPS = {aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def sync_reason(func, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` would wait for the GPU if its tensors were on one (None: it would not)."""
    packet = func.overloadpacket
    if packet is aten._local_scalar_dense:
        return "item/bool/int/float"
    if packet is aten.nonzero:
        return "nonzero"
    if func in UNIQUE_OPS or packet in (aten.unique_dim_consecutive,):
        return "unique"
    if packet is aten.bincount:
        return "bincount"
    if packet is aten.masked_select:
        return "masked_select"
    if packet is aten.equal:
        return "equal"
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 4:
        return "repeat_interleave without output_size"
    if packet is aten.index and _has_bool_index(args[1]):
        return "boolean-mask indexing"
    if packet in (aten.index_put_, aten.index_put, aten._index_put_impl_) and _has_bool_index(args[1]):
        # a scalar assigned through one mask becomes masked_fill (no sync); a tensor of values needs the count
        if args[2].numel() > 1:
            return "boolean-mask assignment"
    if packet is aten.isin and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor):
        # torch sorts (and calls unique) unless the test set is small: numpy's heuristic, as in ATen
        if args[1].numel() >= 10 * args[0].numel() ** 0.145:
            return "isin (sorting path, unique)"
    return None


class SyncWatch(TorchDispatchMode):
    """Records (step, reason, where) for every operation that would sync, while `step` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.step: object = None
        self.paused = 0
        self.events: list[tuple[object, str, str]] = []

    def record(self, reason: str) -> None:
        if self.step is None or self.paused:
            return
        stack = traceback.extract_stack()[:-2]
        for frame in reversed(stack):  # the innermost caller outside torch's own Python layers
            # On a CPU the optimizer keeps its step counters on the host and reads them with `.item()`: no
            # device read in any run (GPU runs use fused AdamW, whose counters stay on the device, unread).
            # Only the optimizer's own calls are exempt: Lightning runs training_step inside its closure.
            if "/torch/optim/" in frame.filename:
                return
            if "/torch/" not in frame.filename:
                break
        frames = [f for f in stack if "/torch/" not in f.filename][-4:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        self.events.append((self.step, reason, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason:
            self.record(reason)
        return func(*args, **kwargs)


class SyncProbe(pl.Callback):
    """Tells the watch which training step (or validation batch) is running."""

    def __init__(self, watch: SyncWatch) -> None:
        self.watch = watch
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # stays set through Lightning's own end-of-batch logging, until the next step or the epoch's end
        self.watch.step = self.batches
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.watch.step = None  # epoch-end metrics may sync once

    def on_validation_start(self, trainer, pl_module) -> None:
        self.watch.step = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.watch.step = ("val", batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.watch.step = None  # callbacks run before the module's epoch end, which computes the metrics


@pytest.fixture
def watched(monkeypatch):
    """A SyncWatch active during `fit`, its probe installed, the batch fetches unwatched, and the progress
    bar the CLI will install (IntervalProgressBar) in place of Lightning's default."""
    watch = SyncWatch()
    probe = SyncProbe(watch)
    original = AskExpertCLI._instantiate_trainer

    def instantiate(self, config, callbacks):
        trainer = original(self, config, callbacks)
        bars = [i for i, c in enumerate(trainer.callbacks) if isinstance(c, ProgressBar)]
        if IntervalProgressBar and bars and not isinstance(trainer.callbacks[bars[0]], IntervalProgressBar):
            trainer.callbacks[bars[0]] = IntervalProgressBar()
        trainer.callbacks.append(probe)
        return trainer

    monkeypatch.setattr(AskExpertCLI, "_instantiate_trainer", instantiate)
    for name in ("__init__", "__next__"):  # a loader's iterator: seeds drawn on the host, batches fetched

        def unwatched(self, *args, _method=getattr(_BaseDataLoaderIter, name), **kwargs):
            watch.paused += 1
            try:
                return _method(self, *args, **kwargs)
            finally:
                watch.paused -= 1

        monkeypatch.setattr(_BaseDataLoaderIter, name, unwatched)
    for name in ("tolist", "numpy"):
        method = getattr(torch.Tensor, name)

        def patched(self, *args, _method=method, _name=name, **kwargs):
            watch.record(f".{_name}()")
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    with watch:
        yield watch, probe


COMMON = [
    "--seed_everything=0",
    "--model.model_name=vit_micro_patch8_32",
    "--model.drop_path_rate=0.0",
    "--data.synthetic_train_per_class=10",
    "--data.synthetic_test_per_class=1",
    "--data.val_fraction=0.1",
    "--data.batch_size=16",
    "--data.eval_batch_size=50",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_epochs=1",
    f"--trainer.limit_train_batches={STEPS}",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=1",
    "--trainer.enable_progress_bar=true",
    "--trainer.enable_model_summary=false",
    f"--trainer.log_every_n_steps={INTERVAL}",
]


@pytest.fixture(scope="module")
def partition_and_base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("syncs")
    partition = root / "partition.json"
    cli_main(["partition", "--method", "superclass", "--out", str(partition), "--data.synthetic_train_per_class", "10"])
    base = root / "base"
    cli_main(
        ["fit", *COMMON, "--model=askexpert.modules.BaseModule", "--trainer.limit_train_batches=1"]
        + ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={base}"]
    )
    return {"partition": partition, "base": base / "checkpoints" / "best.ckpt"}


def expert(name: str, setup: dict[str, Path], *extra: str) -> list[str]:
    args = ["--model=askexpert.modules.ExpertModule", f"--model.base_path={setup['base']}"]
    args += [f"--partition={setup['partition']}", "--expert_index=1", f"--specialization={name}", *extra]
    return args


RUNS = {
    "generalist_mixup": lambda setup: ["--model.mixup_alpha=0.8", "--model.cutmix_alpha=1.0"],
    "expert_progressive_distill": lambda setup: expert(
        "progressive", setup, "--specialization.distill_weight=0.5", "--specialization.unfreeze_until=0.5"
    ),
    "expert_dustbin": lambda setup: expert("dustbin", setup),
}


def describe(events) -> str:
    counts = Counter((reason, where) for _, reason, where in events)
    return "\n".join(f"  {n:3d} x {reason} at {where}" for (reason, where), n in counts.most_common(8))


@pytest.mark.parametrize("run", list(RUNS))
def test_training_steps_do_not_wait_for_the_device(run, watched, partition_and_base, tmp_path, capsys):
    watch, probe = watched
    cli_main(["fit", *COMMON, *RUNS[run](partition_and_base), f"--trainer.default_root_dir={tmp_path / run}"])
    steps = probe.batches
    assert steps == STEPS and (tmp_path / run / "metrics.csv").is_file()
    if IntervalProgressBar is not None:  # the bar still shows the loss, read at the logging steps
        assert "train/loss=" in capsys.readouterr().out

    # after the warm-up, up to the epoch's last step (which ends in epoch-end work that may sync once)
    timed = [e for e in watch.events if isinstance(e[0], int) and WARMUP <= e[0] < steps - 1]
    sync_steps = sorted({step for step, _, _ in timed})
    counted = steps - 1 - WARMUP
    allowed = -(-counted // INTERVAL)  # one per logging interval (the logger, the guard, the bar)
    assert len(sync_steps) <= allowed, (
        f"{run}: the host waits for the device on {len(sync_steps)} of {counted} training steps "
        f"(allowed: {allowed}, one per {INTERVAL}-step logging interval), at steps {sync_steps}:\n{describe(timed)}"
    )
    # and those syncs are the interval's: never on two steps of one interval
    windows = [step // INTERVAL for step in sync_steps]
    assert len(windows) == len(set(windows)), f"{run}: two syncs in one interval at {sync_steps}\n{describe(timed)}"

    in_validation = [e for e in watch.events if isinstance(e[0], tuple)]
    assert not in_validation, f"{run}: validation batches wait for the device:\n{describe(in_validation)}"


def test_the_watch_sees_what_would_sync():
    """The detector itself: each construct that syncs on a GPU is flagged, the sync-free forms are not."""
    watch = SyncWatch()
    watch.step = 0
    x, labels, mask = torch.randn(8, 4), torch.arange(8) % 4, torch.arange(8) % 2 == 0
    with watch:
        x.sum().item()
        bool(mask.any())
        x[mask]
        torch.nonzero(mask)
        torch.isin(labels, torch.arange(30))
        labels.unique()
        y = x.clone()
        y[mask] = x[mask] * 2
    flagged = [reason for _, reason, _ in watch.events]
    assert "item/bool/int/float" in flagged and "boolean-mask indexing" in flagged and "nonzero" in flagged
    assert "isin (sorting path, unique)" in flagged and "unique" in flagged and "boolean-mask assignment" in flagged
    watch.events.clear()
    with watch:
        y = x.clone()
        y[mask] = 0.0  # masked_fill
        torch.where(mask[:, None], x, 0.0)
        torch.zeros(4, dtype=torch.bool)[labels]
        torch.nonzero_static(mask, size=4)
        torch.isin(labels, torch.arange(2))  # small test set: broadcast comparison
    assert not watch.events, watch.events

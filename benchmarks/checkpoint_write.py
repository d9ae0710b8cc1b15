"""What one checkpoint write costs: a run's `last.ckpt` (weights + AdamW state) and `best.ckpt` (weights only).

For each model it builds the network and its AdamW state (one optimizer step), the same dictionary Lightning
writes, and times, interleaved, median of `--repeats`:
* `lightning`: Lightning's own write (`lightning.fabric.utilities.cloud_io._atomic_save`: `torch.save` into
  memory, then an fsspec transaction: temporary file + rename), what every ModelCheckpoint save does;
* `direct`: `torch.save` straight into a temporary file in the same folder, then `os.replace` (as atomic
  for readers: a reader sees the old file or the new one, never half of one);
* `atomic_io`: `askexpert.files.checkpoint_io.AtomicCheckpointIO` (the same with an fsync before the rename, so
  it also survives a power cut), the plugin the CLI can give its Trainers.

    python benchmarks/checkpoint_write.py [--models vit_medium_patch4_32 vit_edge_patch4_32] [--dir DIR]

`--dir` should be on the disk the runs write to. Writes benchmarks/results/checkpoint_write_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def checkpoint_of(model_name: str, device: str, with_optimizer: bool) -> dict:
    import timm

    import askexpert.models  # noqa: F401

    net = timm.create_model(model_name, num_classes=100).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.rand(2, 3, 32, 32, device=device)).sum().backward()
    optimizer.step()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    checkpoint = {"epoch": 0, "global_step": 1, "state_dict": state, "hyper_parameters": {"model_name": model_name}}
    if with_optimizer:
        checkpoint["optimizer_states"] = [optimizer.state_dict()]
    return checkpoint


def lightning_write(checkpoint: dict, path: str) -> None:
    from lightning.fabric.utilities.cloud_io import _atomic_save

    _atomic_save(checkpoint, path)


def direct_write(checkpoint: dict, path: str) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_medium_patch4_32", "vit_edge_patch4_32"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder to write into (default: a temporary one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from askexpert.files.atomic import write_json
    from askexpert.files.checkpoint_io import AtomicCheckpointIO

    writers = {"lightning": lightning_write, "direct": direct_write, "atomic_io": AtomicCheckpointIO().save_checkpoint}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for model in args.models:
            for kind, with_optimizer in (("last (weights + AdamW state)", True), ("best (weights only)", False)):
                checkpoint = checkpoint_of(model, args.device, with_optimizer)
                path = os.path.join(folder, "x.ckpt")
                times: dict[str, list[float]] = {name: [] for name in writers}
                for _ in range(args.repeats):
                    for name, write in writers.items():
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        write(checkpoint, path)
                        times[name].append(time.perf_counter() - start)
                size = os.path.getsize(path) / 1e6
                row = {"model": model, "checkpoint": kind, "mb": size}
                row.update({f"{name}_s": statistics.median(t) for name, t in times.items()})
                row["runs_s"] = times
                rows.append(row)
                cells = ", ".join(f"{name} {row[f'{name}_s']:.3f} s" for name in writers)
                print(f"{model} {kind}: {size:.0f} MB: {cells}", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"checkpoint_write_{args.device}.json"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"device": machine, "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    write_json(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()

"""`pipeline --dry_run true`: the plan as a table, every stage's essentials as resolved (model, batch, lr,
warm-up, epochs, precision, device, clipping) and what a real run would do with it. Nothing is trained or
written, and no GPU trainer is built, so a GPU config can be checked on a laptop.
"""

from __future__ import annotations

from askexpert.pipeline.prepare import PreparedRun
from askexpert.pipeline.record import is_done
from askexpert.pipeline.stages import Stage
from datamodules.sources import cifar100_missing

HEADER = ("stage", "model", "batch", "lr", "warm-up", "epochs", "precision", "device", "clip", "status")


def describe_plan(prepared: PreparedRun) -> str:
    """The dry run's table, under a line naming the run, its data and seed."""
    first: dict[str, dict] = {}  # the resolved config of each family's first expert, which the others point at
    rows = [HEADER]
    for stage in prepared.stages:
        status = _status(prepared, stage)
        if not stage.trains:
            part = prepared.settings.partition
            rows.append((stage.name, f"{part.method}, {part.num_experts} experts", *["-"] * 7, status))
            continue
        config = stage.config if "same_as" not in stage.config else first[stage.config["same_as"]]
        first[stage.name] = config
        rows.append((stage.name, *_essentials(config), status))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    data = prepared.settings.data
    sizes = ""
    if data.source == "synthetic":
        sizes = f" ({data.synthetic_train_per_class} train / {data.synthetic_test_per_class} test per class)"
    head = f"pipeline {prepared.layout.root}: data {data.source}{sizes}, val_fraction {data.val_fraction}, "
    head += f"seed {prepared.settings.seed}"
    notes = []
    if data.source == "cifar100" and cifar100_missing(data.root):
        notes.append(
            f"data: no CIFAR-100 under {data.root}; planned with the official 100 classes and 20 superclasses "
            "(a real run needs the files, or --data.download true where there is a network)"
        )
    return "\n".join([head, *lines, *notes, "dry run: nothing was trained or written"])


def _status(prepared: PreparedRun, stage: Stage) -> str:
    """What a real run would do with the stage, from its entry in stages.json."""
    entry = prepared.record.get(stage.name, {})
    if is_done(entry, stage.identity):
        return "done (skipped)"
    if entry.get("diverged"):
        return "diverged before: retrains" if entry.get("identity") != stage.identity else "diverged before"
    if entry and entry.get("identity") != stage.identity:
        return "changed: retrains" if prepared.settings.overwrite else "changed: needs --overwrite"
    return "resumes" if entry else "to train"


def _essentials(config: dict) -> tuple[str, ...]:
    model, trainer, data = config.get("model", {}), config.get("trainer", {}), config.get("data", {})
    init = model.get("init_args", {})
    name = f"{model.get('class_path', '?').rsplit('.', 1)[-1]} {init.get('model_name', '?')}"
    epochs = str(trainer.get("max_epochs"))
    if trainer.get("max_steps") not in (None, -1):
        epochs += f" (max {trainer['max_steps']} steps)"
    limit = trainer.get("limit_train_batches")
    if limit not in (None, 1.0):
        epochs += f" x {limit:g} batches" if isinstance(limit, (int, float)) else f" x {limit} batches"
    device = f"{trainer.get('accelerator')}:{trainer.get('devices')}"
    clip = trainer.get("gradient_clip_val")
    return (
        name,
        str(data.get("batch_size")),
        f"{init.get('lr', '?'):g}" if isinstance(init.get("lr"), float) else str(init.get("lr")),
        str(init.get("warmup_epochs")),
        epochs,
        str(trainer.get("precision") or "32-true"),
        device,
        "none" if clip in (None, 0) else f"{clip:g}",
    )

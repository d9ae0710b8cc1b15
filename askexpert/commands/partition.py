"""`python -m askexpert partition`: build the experts' class subsets and save them as a JSON artefact.

    python -m askexpert partition --method superclass --num_experts 4 --out runs/partition.json
    python -m askexpert partition --method confusion --generalist runs/demo/generalist/checkpoints/best.ckpt \
        --out runs/partition.json

`confusion` (and `--overlap`) read the generalist's confusion matrix on its validation split. Which images
that is comes from the generalist's checkpoint (the data settings its run saved, `SPLIT_KEYS`), not from the
defaults: with other settings the "validation" images would include images it trained on. A `--data.*` value
that contradicts the checkpoint's is refused; `--data.root` may differ (the same data in another place), and
loader settings (batch sizes, workers) are the user's.
"""

from __future__ import annotations

import os

from askexpert.errors import UserError, check_output_path
from askexpert.files.checkpoints import load_checkpoint
from askexpert.parsers import command_parser
from askexpert.pipeline.partitioning import check_overlap_setting, partition_from_settings, validation_confusion
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import METHODS, Partition

# The DataModule settings that decide which images are the validation split (and what they look like). The
# stand-in's test size does not (its train images never depend on it): it and the root are only defaults.
SPLIT_KEYS = ("source", "image_size", "val_fraction", "seed", "synthetic_train_per_class", "synthetic_seed")
CHECKPOINT_DEFAULTS = ("root", "synthetic_test_per_class")


def generalist_data(checkpoint: str, data: dict, explicit: dict) -> dict:
    """`data` with the split settings of the run that trained `checkpoint` (and its root unless one is given).

    `explicit` holds the `data` values the user set (command line or --config); one that contradicts the
    checkpoint is refused. An expert's checkpoint is refused: it knows only its own classes.
    """
    saved = load_checkpoint(checkpoint, mmap=True)
    subset = saved.get("hyper_parameters", {}).get("subset")
    if subset is not None:
        raise UserError(
            f"{checkpoint} is an expert's checkpoint ({len(subset)} classes); a confusion matrix needs the "
            "generalist's (e.g. RUN/generalist/checkpoints/best.ckpt)"
        )
    trained = saved.get("datamodule_hyper_parameters")
    if not isinstance(trained, dict):
        raise UserError(
            f"{checkpoint} does not record the data it was trained on (no datamodule_hyper_parameters), so its "
            "validation split cannot be known; use a generalist trained with `python -m askexpert fit`"
        )
    settings = {key: trained[key] for key in SPLIT_KEYS if key in trained}
    contradictions = [
        f"--data.{key} {explicit[key]!r} (the generalist's: {settings[key]!r})"
        for key in settings
        if key in explicit and explicit[key] != settings[key]
    ]
    if contradictions:
        raise UserError(
            f"{', '.join(contradictions)}: a confusion partition uses the generalist's own validation split, so "
            "leave these out (they are read from its checkpoint)"
        )
    if settings.get("val_fraction") == 0:
        raise UserError(
            f"{checkpoint} was trained without a validation split (--data.val_fraction 0): it held out no images "
            "to build a confusion matrix on"
        )
    settings.update({key: trained[key] for key in CHECKPOINT_DEFAULTS if key in trained and key not in explicit})
    return {**data, **settings}


def parser():
    p = command_parser("partition", "Split the classes into expert subsets and save them as JSON.")
    p.add_argument("--method", type=str, default="superclass", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--num_experts", type=int, default=4, help="number of experts (N)")
    p.add_argument("--out", type=str, required=True, help="where to write the partition JSON")
    p.add_argument("--generalist", type=str | None, default=None, help="generalist checkpoint (confusion, overlap)")
    p.add_argument("--overlap", type=int, default=0, help="extra most-confused outside classes per expert")
    p.add_argument("--seed", type=int, default=0, help="seed of random and confusion partitions")
    p.add_argument("--experts", type=list[list[int | str]] | None, default=None, help="explicit class lists")
    p.add_argument("--allow_uncovered", type=bool, default=False, help="allow classes that no expert covers")
    return p


def run(argv: list[str]) -> Partition:
    args = parser().parse_args(argv)
    if args.method not in METHODS:
        raise UserError(f"unknown partition method {args.method!r}; methods: {', '.join(METHODS)}")
    check_output_path(args.out, "--out", "file")
    data = args.data.as_dict()
    needs_generalist = args.method == "confusion" or args.overlap > 0  # a negative overlap is refused below
    if needs_generalist and not args.generalist:
        needs = "--method confusion" if args.method == "confusion" else f"--overlap {args.overlap}"
        raise UserError(f"{needs} needs a trained generalist: --generalist CHECKPOINT")
    if args.generalist and not needs_generalist and not args.overlap:
        raise UserError("--generalist is read by --method confusion and --overlap only")
    if needs_generalist:
        given = parser().parse_args(argv, defaults=False).get("data")  # what the user set, not the defaults
        data = generalist_data(args.generalist, data, given.as_dict() if given is not None else {})
        shown = ", ".join(f"{key}={data[key]}" for key in (*SPLIT_KEYS, *CHECKPOINT_DEFAULTS) if key in data)
        print(f"data settings of the generalist's run: {shown}", flush=True)
    datamodule = ImageDataModule(**data)
    if args.overlap:  # before the generalist's confusion is computed
        check_overlap_setting(args, datamodule)
    confusion = validation_confusion(args.generalist, datamodule) if needs_generalist else None
    partition = partition_from_settings(args, datamodule, confusion)
    if args.generalist:
        partition.details["generalist"] = os.path.abspath(args.generalist)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    partition.save(args.out)
    sizes = ", ".join(str(len(classes)) for classes in partition.experts)
    print(
        f"{args.method} partition of {partition.num_classes} classes into {partition.num_experts} experts "
        f"({sizes} classes) written to {args.out}"
    )
    return partition

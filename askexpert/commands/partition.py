"""`python -m askexpert partition`: build the experts' class subsets and save them as a JSON artefact.

    python -m askexpert partition --method superclass --num_experts 4 --out runs/partition.json
    python -m askexpert partition --method confusion --generalist runs/demo/generalist/checkpoints/best.ckpt \
        --config configs/data/synthetic_demo.yaml --out runs/partition.json

`confusion` (and `--overlap`) read the generalist's confusion matrix on the validation split of `--data`.
"""

from __future__ import annotations

import os

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from askexpert.checkpoints import check_same_classes, load_classifier
from askexpert.commands import command_parser
from askexpert.errors import UserError
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import METHODS, Partition, build_partition


@torch.no_grad()
def validation_confusion(checkpoint: str, datamodule: ImageDataModule) -> torch.Tensor:
    """(C, C) counts of true class (rows) vs the generalist's prediction (columns) on the validation split."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_classifier(checkpoint, map_location=device)
    check_same_classes(model, datamodule, f"generalist {checkpoint}")
    if datamodule.split_sizes()["val"] == 0:
        raise UserError("a confusion partition needs a validation split: set --data.val_fraction above 0")
    matrix = MulticlassConfusionMatrix(datamodule.num_classes).to(device)
    for images, labels in datamodule.dataloader("val"):
        matrix.update(model(images.to(device))[:, : datamodule.num_classes], labels.to(device))
    return matrix.compute().cpu()


def partition_from_settings(settings, datamodule: ImageDataModule, confusion: torch.Tensor | None) -> Partition:
    """`build_partition` from settings with the partition options (this command's, or a pipeline's section)."""
    return build_partition(
        settings.method,
        datamodule.class_names,
        num_experts=settings.num_experts,
        class_to_superclass=datamodule.class_to_superclass,
        confusion=confusion,
        experts=settings.experts,
        overlap=settings.overlap if confusion is not None else 0,
        seed=settings.seed,
        allow_uncovered=settings.allow_uncovered,
    )


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
    datamodule = ImageDataModule(**args.data.as_dict())
    confusion = None
    if args.method == "confusion" or args.overlap:
        if not args.generalist:
            needs = "--method confusion" if args.method == "confusion" else f"--overlap {args.overlap}"
            raise UserError(f"{needs} needs a trained generalist: --generalist CHECKPOINT")
        confusion = validation_confusion(args.generalist, datamodule)
    elif args.generalist:
        raise UserError("--generalist is read by --method confusion and --overlap only")
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

"""`--data.image_size`: the size the models see, for every source; images stay stored (and sent) at their own size.

A patch-16 timm ViT at 64 px trains a few steps on CIFAR-100 (official-layout tiny files), an image folder and
the stand-in; a model/data size mismatch is one line before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS
from helpers.cli import one_line, run_main
from helpers.datasets import make_folder, write_cifar

from askexpert.errors import UserError
from askexpert.files.checkpoints import load_checkpoint
from askexpert.modules import GeneralistModule
from askexpert.modules.loading import load_classifier
from datamodules.datamodule import ImageDataModule

VIT16 = ["--model.model_name", "vit_tiny_patch16_224", "--trainer.limit_train_batches", "2"]
FEW = ["--data.batch_size", "4", "--data.val_fraction", "0.2", "--trainer.limit_val_batches", "1"]


def _sources(tmp_path: Path) -> dict[str, list[str]]:
    write_cifar(tmp_path / "cifar")
    make_folder(tmp_path / "folder")
    return {
        "cifar100": [
            "--data.source",
            "cifar100",
            "--data.root",
            str(tmp_path / "cifar"),
            "--data.verify_checksums",
            "false",
        ],
        "imagefolder": ["--data.source", "imagefolder", "--data.root", str(tmp_path / "folder")],
        "synthetic": [],
    }


@pytest.mark.parametrize("source", ["cifar100", "imagefolder", "synthetic"])
def test_a_patch16_vit_trains_at_64_px_on_every_source(source, tmp_path, capsys) -> None:
    root = tmp_path / "run"
    args = ["fit", *TINY_ARGS, *VIT16, *FEW, *_sources(tmp_path)[source], "--data.image_size", "64"]
    code, _, err = run_main([*args, "--trainer.default_root_dir", str(root)], capsys)
    assert code == 0, err
    hparams = load_checkpoint(str(root / "checkpoints" / "last.ckpt"))["hyper_parameters"]
    assert hparams["image_size"] == 64
    model = load_classifier(str(root / "checkpoints" / "best.ckpt"))
    assert model.net.patch_embed.grid_size == (4, 4)  # built at 64 px: a 4x4 grid of 16-px patches
    rows = (root / "metrics.csv").read_text().splitlines()
    losses = [float(v) for line in rows[1:] for v in [line.split(",")[rows[0].split(",").index("train/loss")]] if v]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    stored = 32 if source != "imagefolder" else 64  # CIFAR-100 and the stand-in stay 32 px; a folder loads at 64
    root_arg = args[args.index("--data.root") + 1] if source != "synthetic" else None
    data = ImageDataModule(
        source=source,
        root=root_arg,
        image_size=64,
        verify_checksums=False,
        synthetic_train_per_class=10,
        synthetic_test_per_class=2,
    )
    assert data.tensors("test")[0].shape[-1] == stored


def test_the_model_resizes_stored_images_on_the_device() -> None:
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, image_size=48).eval()
    small = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert model(small).shape == (3, 10)
    resized = torch.nn.functional.interpolate(small.float() / 255, size=(48, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(model(small), model(resized), atol=1e-5)  # the same as giving 48-px images
    big = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    assert model(big).shape == (2, 10)  # larger stored images are shrunk (antialiased)


def test_a_folder_can_be_stored_smaller_than_the_model_sees(tmp_path) -> None:
    data = ImageDataModule(source="imagefolder", root=str(make_folder(tmp_path)), image_size=64, stored_size=16)
    assert data.tensors("train")[0].shape[-2:] == (16, 16) and data.stored_image_size == 16 and data.image_size == 64


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            ["--model.img_size", "32", "--data.image_size", "64"],
            ["--model.img_size 32 differs from --data.image_size 64"],
        ),
        (["--model.model_name", "vit_tiny_patch16_224", "--data.image_size", "8"], ["vit_tiny_patch16_224", "8x8"]),
    ],
)
def test_a_size_the_model_cannot_take_is_one_line(extra, fragments, tmp_path, capsys) -> None:
    root = tmp_path / "run"
    code, _, err = run_main(["fit", *TINY_ARGS, *extra, "--trainer.default_root_dir", str(root)], capsys)
    one_line(code, err, *fragments)
    assert not root.exists()


def test_cifar100_is_stored_at_its_own_size(tmp_path) -> None:
    with pytest.raises(UserError, match="CIFAR-100's images are 32 px"):
        ImageDataModule(source="cifar100", root=str(tmp_path), stored_size=64)


def test_evaluating_a_checkpoint_at_another_size_is_one_line(tiny_generalist_run, capsys) -> None:
    ckpt = tiny_generalist_run / "checkpoints" / "best.ckpt"
    code, _, err = run_main(["test", *TINY_ARGS, "--ckpt_path", str(ckpt), "--data.image_size", "64"], capsys)
    one_line(code, err, "trained on 32 px images but --data.image_size is 64")

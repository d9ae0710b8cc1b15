"""Tiny pipeline configs (micro ViTs, a few stand-in images, one epoch) and a small image folder for them."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from conftest import REPO

STAGE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    },
    "data": {"batch_size": 64, "eval_batch_size": 256},
}


STAGE_FILES = ("generalist", "base", "expert")


TINY_DATA = {"source": "synthetic", "synthetic_train_per_class": 10, "synthetic_test_per_class": 3, "val_fraction": 0.2}


def write_configs(folder: Path, model_name: str = "vit_micro_patch8_32") -> Path:
    """Fit configs of the three kinds of stage plus a pipeline config that uses them; returns the latter."""
    models = {
        "generalist": {"class_path": "askexpert.modules.GeneralistModule"},
        "base": {"class_path": "askexpert.modules.BaseModule"},
        "expert": {"class_path": "askexpert.modules.ExpertModule", "init_args": {"init": "base"}},
    }
    for name in STAGE_FILES:
        model = {**models[name], "init_args": {"model_name": model_name, "warmup_epochs": 0}}
        model["init_args"].update(models[name].get("init_args", {}))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**STAGE, "model": model}))
    pipeline = {
        "data": TINY_DATA,
        "generalist": {"config": [str(folder / "generalist.yaml")]},
        "base": {"config": [str(folder / "base.yaml")]},
        "partition": {"method": "superclass", "num_experts": 2},
        "experts": {"config": [str(folder / "expert.yaml")], "overrides": {"trainer.limit_train_batches": 3}},
        "specialization": "progressive",
        "profile": str(REPO / "configs" / "profiles" / "pi4_wifi_orin.yaml"),
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def make_four_class_folder(root: Path, side: int) -> Path:
    """ROOT/{train,test}/{ant,bee,cat,dog}/*.png: 6 train and 2 test images per class, side x side pixels."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(("ant", "bee", "cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
                pixels[..., c % 3] = 40 * c  # a little class signal
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root

"""Any timm classification model as generalist, base and expert: every strategy and the whole pipeline with a
ResNet (no patch grid, no `img_size`), on tiny data, with the fine-tuning augmentations switched on."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import TINY_ARGS
from helpers.cli import run_main
from helpers.pipelines import make_four_class_folder, write_configs

from askexpert.cli import cli_main
from askexpert.modules import ExpertModule
from askexpert.modules.loading import load_classifier

RESNET = ["--model.model_name", "resnet18", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


@pytest.fixture(scope="module")
def resnet_base(tmp_path_factory, tiny_pipeline_run) -> dict:
    """A ResNet base model, and the session's tiny pipeline's 2-expert partition (read-only)."""
    base = tmp_path_factory.mktemp("resnet") / "base"
    cli_main(
        ["fit", *TINY_ARGS, *RESNET, "--model", "askexpert.modules.BaseModule", "--trainer.default_root_dir", str(base)]
    )
    return {"base": base / "checkpoints" / "best.ckpt", "partition": tiny_pipeline_run[1] / "partition.json"}


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("full", ["--data.auto_augment", "trivialaugment"]),
        ("static", ["--model.random_erase", "0.5"]),
        ("dustbin", ["--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0"]),
        ("progressive", ["--specialization.distill_weight", "0.5", "--model.cutmix_alpha", "1.0"]),
    ],
)
def test_every_strategy_trains_a_resnet_expert(resnet_base, tmp_path, name, extra) -> None:
    run = tmp_path / name
    args = ["fit", *TINY_ARGS, *RESNET, "--model", "askexpert.modules.ExpertModule", "--model.base_path"]
    args += [str(resnet_base["base"]), "--partition", str(resnet_base["partition"]), "--expert_index", "1"]
    args += ["--specialization", name, *extra, "--trainer.default_root_dir", str(run)]
    cli = cli_main(args)
    model = cli.model
    assert isinstance(model, ExpertModule) and model.net.get_classifier().out_features == 100 + (name == "dustbin")
    with open(run / "metrics.csv", newline="") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    reloaded = load_classifier(str(run / "checkpoints" / "best.ckpt"))
    assert type(reloaded.net).__name__ == "ResNet"


# slow (~55 s): the default run trains a ResNet expert with every strategy; this adds the whole pipeline + route
@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_with_resnets_at_another_size(tmp_path, capsys) -> None:
    """Every stage a ResNet that sees 48-px images of a folder stored at 24 px; `route` answers new images."""
    root = make_four_class_folder(tmp_path / "images", side=30)
    config = write_configs(tmp_path, model_name="resnet18")
    out = tmp_path / "run"
    args = ["pipeline", "--config", str(config), "--out", str(out), "--data.source", "imagefolder"]
    args += ["--data.root", str(root), "--partition.method", "random", "--data.image_size", "48"]
    args += ["--data.stored_size", "24", "--static_baseline", "false"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["costs"]["image_bytes"] == 3 * 24 * 24  # the edge sends the stored image
    assert {m["model_name"] for m in report["costs"]["models"].values()} == {"resnet18"}
    assert {m["image_size"] for m in report["costs"]["models"].values()} == {48}  # FLOPs at the size computed
    code, _, err = run_main(
        ["route", "--run", str(out), "--images", str(root / "test"), "--out", str(tmp_path / "r.csv")], capsys
    )
    assert code == 0, err
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8

"""The weight EMA (`--model.ema_decay`, timm's ModelEmaV3): off by default (no identity changes), evaluated in
validation, written as the model's weights in best.ckpt, kept next to the raw weights in last.ckpt, and resumed
exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ARGS
from helpers.cli import assert_clean_failure, run_main

from askexpert.cli import cli_main
from askexpert.files.checkpoints import load_checkpoint
from askexpert.modules import GeneralistModule
from askexpert.modules.loading import load_classifier

# a constant learning rate (TINY_ARGS: no warm-up), so 1 epoch + a resume to 2 follows the 2-epoch run's schedule
FAST = [*TINY_ARGS, "--model.schedule", "constant", "--trainer.limit_train_batches", "3"]
EMA = ["--model.ema_decay", "0.9"]


def fit(root: Path, *extra: str):
    return cli_main(["fit", *FAST, *extra, "--trainer.default_root_dir", str(root)])


def checkpoint(root: Path, name: str) -> dict:
    return load_checkpoint(str(root / "checkpoints" / name))


def net_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len("net.") :]: value for key, value in state.items() if key.startswith("net.")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two-epoch runs without and with the EMA, and the EMA run as 1 epoch (copied aside) + a resume to 2."""
    folder = tmp_path_factory.mktemp("ema")
    found = {"folder": folder}
    fit(folder / "plain", "--trainer.max_epochs", "2")
    fit(folder / "whole", *EMA, "--trainer.max_epochs", "2")
    first = fit(folder / "resumed", *EMA, "--trainer.max_epochs", "1")
    found["val_loss"] = float(first.trainer.callback_metrics["val/loss"])
    found["val_batches"] = list(first.datamodule.val_dataloader())
    shutil.copytree(folder / "resumed", folder / "one_epoch")
    fit(folder / "resumed", *EMA, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    return found


def test_bad_decays_are_refused_in_one_line_before_training(tmp_path, capsys):
    for value in ("1.5", "-0.1", "1", "0"):
        run_dir = tmp_path / f"run{value}"
        args = ["fit", *FAST, "--model.ema_decay", value, "--trainer.default_root_dir", str(run_dir)]
        code, _, err = run_main(args, capsys)
        assert_clean_failure(code, err, run_dir, "--model.ema_decay", "(0, 1)")
    with pytest.raises(Exception, match="ema_warmup needs"):
        GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, ema_warmup=True)


def test_off_by_default_keeps_stage_identities():
    from askexpert.pipeline.stages import _identity_config

    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10)
    assert model.hparams.ema_decay is None and model.hparams.ema_warmup is False and model.ema is None
    args = {"lr": 0.001, "random_erase": 0.0}
    before = {"model": {"class_path": "askexpert.modules.GeneralistModule", "init_args": args}}
    now = {"model": {**before["model"], "init_args": {**args, "ema_decay": None, "ema_warmup": False}}}
    assert (
        _identity_config(now) == _identity_config(before) == {"model": {**before["model"], "init_args": {"lr": 0.001}}}
    )
    on = {"model": {**before["model"], "init_args": {**args, "ema_decay": 0.9998}}}
    assert _identity_config(on)["model"]["init_args"]["ema_decay"] == 0.9998  # a run with the EMA is another stage


def test_without_ema_checkpoints_are_as_before_and_the_ema_leaves_training_alone(runs):
    plain, whole = runs["folder"] / "plain", runs["folder"] / "whole"
    last = checkpoint(plain, "last.ckpt")
    assert "ema_state_dict" not in last and "ema_state_dict" not in checkpoint(plain, "best.ckpt")
    assert last["hyper_parameters"]["ema_decay"] is None
    # the EMA draws no random number and evaluation swaps weights exactly: the raw weights train identically
    assert same(last["state_dict"], checkpoint(whole, "last.ckpt")["state_dict"])


def test_best_ckpt_holds_the_ema_weights_and_last_ckpt_both(runs):
    one = runs["folder"] / "one_epoch"
    best, last = checkpoint(one, "best.ckpt"), checkpoint(one, "last.ckpt")
    assert best["epoch"] == last["epoch"] == 0
    ema = last["ema_state_dict"]
    assert all(value.dtype == torch.float32 for value in ema.values())
    assert same(net_weights(best["state_dict"]), ema)
    assert not same(net_weights(last["state_dict"]), ema)  # last.ckpt: the raw weights, to resume with
    assert "ema_state_dict" not in best
    # every consumer loads the EMA weights without knowing about them
    model = load_classifier(str(one / "checkpoints" / "best.ckpt"))
    assert model.ema is None and same(model.net.state_dict(), ema)


def test_validation_evaluates_the_ema_weights(runs):
    one = runs["folder"] / "one_epoch"
    raw = load_classifier(str(one / "checkpoints" / "best.ckpt"))
    raw.net.load_state_dict(net_weights(checkpoint(one, "last.ckpt")["state_dict"]))

    def loss(model) -> float:
        with torch.no_grad():
            logits = torch.cat([model(images) for images, _ in runs["val_batches"]])
        labels = torch.cat([labels for _, labels in runs["val_batches"]])
        return float(F.cross_entropy(logits, labels))

    ema = load_classifier(str(one / "checkpoints" / "best.ckpt"))
    assert loss(ema) == pytest.approx(runs["val_loss"], abs=1e-5)
    assert abs(loss(raw) - runs["val_loss"]) > 1e-4


def test_a_resumed_run_ends_with_the_same_raw_and_ema_weights(runs):
    whole, resumed = runs["folder"] / "whole", runs["folder"] / "resumed"
    a, b = checkpoint(whole, "last.ckpt"), checkpoint(resumed, "last.ckpt")
    assert a["epoch"] == b["epoch"] == 1
    assert same(a["state_dict"], b["state_dict"])
    assert same(a["ema_state_dict"], b["ema_state_dict"])
    assert same(checkpoint(whole, "best.ckpt")["state_dict"], checkpoint(resumed, "best.ckpt")["state_dict"])


def test_an_expert_starts_from_the_base_ema_weights_and_keeps_its_own(tmp_path):
    fit(tmp_path / "base", "--model", "askexpert.modules.BaseModule", *EMA)  # an expert starts from a base model
    base = tmp_path / "base" / "checkpoints" / "best.ckpt"  # its EMA weights
    root = tmp_path / "expert"
    args = ["--model", "askexpert.modules.ExpertModule", "--model.model_name", "vit_micro_patch8_32"]
    args += ["--model.subset", "[0, 1, 2]", "--model.init", "base", "--model.base_path", str(base)]
    fit(root, *args, *EMA, "--model.ema_warmup", "true")
    best, last = checkpoint(root, "best.ckpt"), checkpoint(root, "last.ckpt")
    assert same(net_weights(best["state_dict"]), last["ema_state_dict"])
    assert best["hyper_parameters"]["ema_warmup"] is True

"""The classifier LightningModule: metrics on hand-made logits, normalisation, optimiser, checkpoints."""

import pytest
import torch

from askexpert.errors import UserError
from askexpert.modules import GeneralistModule
from askexpert.modules.loading import load_classifier
from askexpert.modules.metrics import ClassificationMetrics


def one_hot_logits(preds, num_classes):
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float() * 10


def test_metrics_on_hand_made_predictions():
    # 6 classes in 2 superclasses: {0,1,2} -> 0, {3,4,5} -> 1
    metrics = ClassificationMetrics(6, [0, 0, 0, 1, 1, 1], ["low", "high"])
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    preds = [0, 2, 2, 4, 4, 0, 0, 3]  # wrong: 1->2 (same super), 3->4 (same), 5->0 (other)
    metrics.update(one_hot_logits(preds, 6), targets)
    out = metrics.compute()
    assert out["acc"] == pytest.approx(5 / 8)
    assert out["superclass_acc"] == pytest.approx(7 / 8)
    assert out["within_superclass_error_share"] == pytest.approx(2 / 3)
    # per-superclass: mean per-class recall of classes {0,1,2}: (1 + 0 + 1) / 3; {3,4,5}: (0.5 + 1 + 0) / 3
    assert out["superclass/low"] == pytest.approx(2 / 3)
    assert out["superclass/high"] == pytest.approx(0.5)
    assert out["acc5"] >= out["acc"]  # ties among the other logits make top-5 membership arbitrary


def test_metrics_without_hierarchy_or_with_few_classes():
    metrics = ClassificationMetrics(3)
    metrics.update(one_hot_logits([0, 1, 1], 3), torch.tensor([0, 1, 2]))
    out = metrics.compute()
    assert set(out) == {"acc", "acc3", "images"} and out["acc"] == pytest.approx(2 / 3) and out["images"] == 3


def test_module_normalises_uint8_and_float_inputs_identically():
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(model(images), model(images.float() / 255), atol=1e-5)
    normalised = model.preprocess(torch.full((1, 3, 32, 32), 0.5))
    assert torch.allclose(normalised[0, :, 0, 0], (0.5 - model.mean.flatten()) / model.std.flatten())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="linear"), "unknown schedule 'linear'"),
        (dict(num_classes=1), "at least 2 classes"),
        (dict(lr=0), "lr must be positive"),
        (dict(model_name="resnet_nope"), "unknown model 'resnet_nope'"),
    ],
)
def test_bad_module_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        GeneralistModule(**{"model_name": "vit_micro_patch8_32", **kwargs})


def test_mixup_gives_soft_targets_and_a_finite_loss():
    torch.manual_seed(0)
    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    inputs, targets = model.mixup(model.preprocess(images), torch.arange(8) % 10)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert torch.isfinite(model.training_loss(model.net(inputs), targets))


def test_checkpoint_round_trip_through_load_classifier(tmp_path):
    import lightning.pytorch as pl

    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, class_to_superclass=[0] * 5 + [1] * 5)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_classifier(str(path))
    assert type(loaded) is GeneralistModule and not loaded.training
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(loaded(images), model.eval()(images))
    assert loaded.hparams.class_to_superclass == [0] * 5 + [1] * 5


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "not_a_checkpoint"])
def test_broken_checkpoints_give_one_clear_error(tmp_path, damage):
    import lightning.pytorch as pl

    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_bytes":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :])
    else:
        path.write_text("hello")
    with pytest.raises(UserError, match=f"checkpoint {path} is (truncated|corrupt)"):
        load_classifier(str(path))

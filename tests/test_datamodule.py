"""DataModule splits, per-class views, and the batched on-device augmentation."""

import pytest
import torch

from askexpert.errors import UserError
from datamodules.augment import random_crop_flip
from datamodules.datamodule import ImageDataModule, stratified_holdout


def tiny_dm(**kwargs) -> ImageDataModule:
    args = dict(synthetic_train_per_class=10, synthetic_test_per_class=3, batch_size=32)
    args.update(kwargs)
    dm = ImageDataModule(**args)
    dm.setup()
    return dm


def test_split_sizes_are_disjoint_and_stratified():
    dm = tiny_dm(val_fraction=0.2)
    sizes = dm.split_sizes()
    assert sizes == {"train": 800, "val": 200, "test": 300}
    train_x, train_y = dm.tensors("train")
    val_x, val_y = dm.tensors("val")
    assert train_x.dtype == torch.uint8 and train_x.shape[1:] == (3, 32, 32)
    # every class keeps 8 training and gives 2 validation images
    assert torch.bincount(val_y, minlength=100).eq(2).all()
    assert torch.bincount(train_y, minlength=100).eq(8).all()
    # no validation image is also a training image
    train_keys = {bytes(img.numpy()) for img in train_x}
    assert not any(bytes(img.numpy()) in train_keys for img in val_x)


def test_holdout_is_seeded():
    labels = torch.arange(10).repeat_interleave(20)
    a_keep, a_held = stratified_holdout(labels, 0.25, seed=1)
    b_keep, b_held = stratified_holdout(labels, 0.25, seed=1)
    c_keep, c_held = stratified_holdout(labels, 0.25, seed=2)
    assert torch.equal(a_held, b_held) and torch.equal(a_keep, b_keep)
    assert not torch.equal(a_held, c_held)
    assert len(a_held) == 50 and len(a_keep) == 150
    assert set(a_held.tolist()).isdisjoint(a_keep.tolist())


def test_metadata_is_known_before_setup():
    dm = ImageDataModule()
    assert dm.num_classes == 100
    assert len(dm.superclass_names) == 20
    assert dm.class_names[0] == "apple" and dm.stand_in
    assert dm.describe.__doc__


def test_describe_reports_stand_in_and_sizes():
    info = tiny_dm().describe()
    assert info["stand_in"] is True and info["source"] == "synthetic"
    assert info["train_size"] + info["val_size"] == 1000 and info["test_size"] == 300


def test_expert_view_contains_only_its_classes():
    dm = tiny_dm()
    idx = dm.indices_of_classes("train", [3, 7, 42])
    labels = dm.tensors("train")[1][idx]
    assert set(labels.tolist()) == {3, 7, 42}
    assert len(idx) == int(torch.isin(dm.tensors("train")[1], torch.tensor([3, 7, 42])).sum())
    loader = dm.dataloader("train", indices=idx, shuffle=True)
    images, batch_labels = next(iter(loader))
    assert images.dtype == torch.uint8 and set(batch_labels.tolist()) <= {3, 7, 42}


@pytest.mark.parametrize("classes, message", [([], "empty"), ([0, 100], "out of range"), ([-1], "out of range")])
def test_expert_view_rejects_bad_subsets(classes, message):
    with pytest.raises(UserError, match=message):
        tiny_dm().indices_of_classes("train", classes)


def test_loader_yields_whole_uint8_batches():
    dm = tiny_dm()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert len(dm.train_dataloader()) == 900 // 32  # drop_last on training batches


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(batch_size=0), "batch_size"),
        (dict(source="cifar100"), "needs --data.root"),
        (dict(source="mnist"), "unknown data source 'mnist'; known sources: cifar100, imagefolder, synthetic"),
        (dict(synthetic_train_per_class=500, max_memory_gb=0.01), "max_memory_gb"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        ImageDataModule(**kwargs).setup()


# -- augmentation ---------------------------------------------------------------------------------------
def test_crop_offsets_stay_within_the_padding():
    torch.manual_seed(0)
    # Each image is a ramp whose top-left value reveals the crop offset.
    h = w = 8
    base = (torch.arange(h)[:, None] * 100 + torch.arange(w)[None, :] + 1).float()
    images = base.expand(500, 3, h, w).clone()
    out = random_crop_flip(images, padding=2, flip=False)
    assert out.shape == images.shape
    # the centre pixel of a crop moved by (dy, dx) in [-2, 2] equals base[4 + dy, 4 + dx]
    centre = out[:, 0, 4, 4]
    dy, dx = (centre // 100).long() - 4, (centre % 100).long() - 1 - 4
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == 25  # every offset occurs
    # padding is zeros: a crop shifted by the full padding shows zero rows
    assert (out == 0).any()


def test_flip_rate_is_about_half_and_flips_are_mirror_images():
    torch.manual_seed(0)
    images = torch.arange(32, dtype=torch.float32).expand(4000, 3, 32, 32).clone()
    out = random_crop_flip(images, padding=0, flip=True)
    flipped = (out[:, 0, 0, 0] == 31).float()
    assert 0.46 < flipped.mean() < 0.54
    assert torch.equal(out[flipped.bool()], images[flipped.bool()].flip(-1))
    assert torch.equal(out[~flipped.bool()], images[~flipped.bool()])


def test_augmentation_keeps_dtype_and_runs_only_while_training():
    dm = tiny_dm()
    batch = dm.tensors("train")[0][:16], dm.tensors("train")[1][:16]

    class FakeTrainer:
        training = False

    dm.trainer = FakeTrainer()
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]
    FakeTrainer.training = True
    images, labels = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.uint8 and torch.equal(labels, batch[1])
    assert not torch.equal(images, batch[0])


def test_model_normalisation_matches_its_statistics():
    """uint8 images drawn around the dataset mean with half its spread (no clipping at 0 and 255) come out of
    `preprocess` with mean 0 and std 0.5."""
    from askexpert.modules import GeneralistModule

    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10)
    mean, std = torch.tensor(model.hparams.mean), torch.tensor(model.hparams.std)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 3, 32, 32, generator=generator)
    pixels = (mean.view(1, 3, 1, 1) + 0.5 * std.view(1, 3, 1, 1) * noise) * 255
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    out = model.preprocess(images)
    assert out.dtype == torch.float32
    assert out.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (out.std(dim=(0, 2, 3)) - 0.5).abs().max() < 0.03
    assert torch.allclose(model.preprocess(images.float() / 255), out)  # [0, 1] floats are the same input


def test_loaders_use_host_tensors_unless_a_trainer_runs_on_a_gpu():
    dm = tiny_dm()

    class CPUTrainer:
        class strategy:  # noqa: N801 - mimics trainer.strategy.root_device
            root_device = torch.device("cpu")

    assert dm.loader_tensors("train")[0] is dm.tensors("train")[0]  # no trainer
    dm.trainer = CPUTrainer()
    assert dm.loader_tensors("train")[0] is dm.tensors("train")[0]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.device.type == "cpu" and images.dtype == torch.uint8

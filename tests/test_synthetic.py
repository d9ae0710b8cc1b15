"""The offline CIFAR-100 stand-in: shape, determinism, instance variety and the superclass hierarchy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from askexpert.errors import UserError
from datamodules.labels import CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE
from datamodules.synthetic import _CHUNK, fine_accuracy_ceiling, make_synthetic, synthetic_metadata

COARSE = torch.tensor(CIFAR100_FINE_TO_COARSE)


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """The probes' tiny matmuls gain nothing from 2 threads and slow down badly when another process holds a core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small() -> object:
    return make_synthetic(train_per_class=3, test_per_class=2, seed=0)


@pytest.fixture(scope="module")
def probe_data() -> object:
    """Enough images for a linear probe; 40 per class keeps the whole file fast."""
    return make_synthetic(train_per_class=40, test_per_class=20, seed=0)


def test_metadata_matches_cifar100() -> None:
    classes, superclasses, class_to_superclass = synthetic_metadata()
    assert classes == list(CIFAR100_FINE_NAMES) and len(classes) == 100
    assert superclasses == list(CIFAR100_COARSE_NAMES) and len(superclasses) == 20
    assert class_to_superclass == list(CIFAR100_FINE_TO_COARSE)
    assert sorted(torch.bincount(torch.tensor(class_to_superclass)).tolist()) == [5] * 20


def test_shapes_dtypes_labels_and_flags(small) -> None:
    assert small.train_images.shape == (300, 3, 32, 32) and small.test_images.shape == (200, 3, 32, 32)
    assert small.train_images.dtype == torch.uint8 and small.test_images.dtype == torch.uint8
    assert small.train_labels.dtype == torch.int64 and small.test_labels.dtype == torch.int64
    assert torch.bincount(small.train_labels, minlength=100).tolist() == [3] * 100
    assert torch.bincount(small.test_labels, minlength=100).tolist() == [2] * 100
    # Image-major rows: every prefix of 100 rows holds each class once.
    assert small.train_labels[:100].tolist() == list(range(100))
    assert small.stand_in is True
    assert (small.class_names, small.superclass_names, small.class_to_superclass) == synthetic_metadata()
    assert small.num_classes == 100


@pytest.mark.parametrize("size", [16, 48])
def test_other_image_sizes(size: int) -> None:
    splits = make_synthetic(train_per_class=1, test_per_class=1, image_size=size)
    assert splits.train_images.shape == (100, 3, size, size)


def test_image_size_changes_the_resolution_not_the_instances() -> None:
    small = make_synthetic(train_per_class=1, test_per_class=1, image_size=32).train_images.float()
    pooled = F.avg_pool2d(make_synthetic(train_per_class=1, test_per_class=1, image_size=64).train_images.float(), 2)
    same = (pooled - small).abs().mean()
    assert same < 0.3 * (pooled - small.roll(1, 0)).abs().mean(), f"mean |difference| {same:.1f}"


def test_pixels_use_the_range() -> None:
    images = make_synthetic(train_per_class=5, test_per_class=1).train_images.float()
    assert images.min() <= 5 and images.max() >= 250
    assert 80 < images.mean() < 170 and images.std() > 40
    per_channel = images.mean((0, 2, 3))
    assert (per_channel.max() - per_channel.min()) < 30  # no strong global colour cast


def test_deterministic_and_seed_dependent(small) -> None:
    again = make_synthetic(train_per_class=3, test_per_class=2, seed=0)
    assert torch.equal(again.train_images, small.train_images) and torch.equal(again.test_images, small.test_images)
    other = make_synthetic(train_per_class=3, test_per_class=2, seed=1)
    assert not torch.equal(other.train_images, small.train_images)
    assert not torch.equal(other.test_images, small.test_images)
    assert torch.equal(other.train_labels, small.train_labels)


def test_splits_are_independent_and_grow_by_appending(small) -> None:
    more_test = make_synthetic(train_per_class=3, test_per_class=5, seed=0)
    assert torch.equal(more_test.train_images, small.train_images)
    assert torch.equal(more_test.test_images[:200], small.test_images)
    more_train = make_synthetic(train_per_class=4, test_per_class=2, seed=0)
    assert torch.equal(more_train.test_images, small.test_images)
    assert torch.equal(more_train.train_images[:300], small.train_images)
    # Train and test are different streams, not copies of each other.
    assert not torch.equal(small.train_images[:200], small.test_images)


def test_growing_across_a_chunk_boundary_keeps_the_prefix() -> None:
    short = make_synthetic(train_per_class=1, test_per_class=_CHUNK - 1, seed=3).test_images
    long = make_synthetic(train_per_class=1, test_per_class=_CHUNK + 2, seed=3).test_images
    assert torch.equal(long[: len(short)], short)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_per_class": 0}, "train_per_class must be a positive int"),
        ({"test_per_class": -3}, "test_per_class must be a positive int"),
        ({"train_per_class": 2.5}, "train_per_class must be an int"),
        ({"test_per_class": True}, "test_per_class must be an int"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"seed": "0"}, "seed must be an int"),
        ({"image_size": 8}, "image_size must be at least 16"),
    ],
)
def test_argument_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_synthetic(**kwargs)


def test_every_image_is_a_new_instance(probe_data) -> None:
    images, labels = probe_data.train_images.float(), probe_data.train_labels
    ratios = []
    for c in range(100):
        members = images[labels == c].flatten(1)
        distances = torch.cdist(members, members)
        assert distances[~torch.eye(len(members), dtype=torch.bool)].min() > 0, f"class {c} repeats an image"
        # Spread of the images around their class mean, against the structure of the mean image itself:
        # a template-plus-noise generator has a ratio well below 1; here nuisances dominate.
        ratios.append((members.var(0).mean() / members.mean(0).var()).item())
    ratios = torch.tensor(ratios)
    assert ratios.min() > 0.8 and ratios.median() > 2.5, f"min {ratios.min():.2f}, median {ratios.median():.2f}"


def test_design_ceiling_leaves_siblings_overlapping() -> None:
    assert 0.75 <= fine_accuracy_ceiling() <= 0.9


def _linear_probe(splits, seed: int, steps: int = 300) -> tuple[float, float, float]:
    """Softmax regression on 16x16 pixels; returns (fine acc, superclass acc, within-superclass error share)."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float() / 127.5 - 1, 2).flatten(1)

    x, y = features(splits.train_images), splits.train_labels
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(features(splits.test_images)).argmax(1)
    truth = splits.test_labels
    same_super = COARSE[pred] == COARSE[truth]
    wrong = pred != truth
    fine = (pred == truth).float().mean().item()
    return fine, same_super.float().mean().item(), same_super[wrong].float().mean().item()


def test_linear_probe_confuses_mostly_within_superclasses(probe_data) -> None:
    # Measured over seeds 0-5: fine 0.18-0.19, superclass 0.77-0.79, within-superclass share 0.72-0.74.
    fine, superclass, within = _linear_probe(probe_data, seed=0)
    assert fine > 0.1  # chance 0.01
    assert superclass > 0.6 and superclass > 3 * fine  # chance 0.05
    assert within > 0.6  # chance 4/99 ~ 0.04

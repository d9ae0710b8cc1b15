"""`datamodules.augment.auto_augment`: RandAugment / TrivialAugment drawn per image, applied per group.

The reference below is written independently of the module, with torchvision's public functional API and the
magnitude tables of torchvision's `v2.RandAugment` / `v2.TrivialAugmentWide` copied out by hand, so these tests
fail if the module applies the wrong op, the wrong magnitude, or writes a group's results to the wrong images.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from askexpert.errors import UserError
from datamodules import augment
from datamodules.augment import auto_augment

POLICIES = ("randaugment", "trivialaugment")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
ALL_OPS = SIGNED | {"Identity", "Posterize", "Solarize", "AutoContrast", "Equalize"}


def official_magnitudes(policy: str, num_bins: int, height: int, width: int) -> dict[str, list[float]]:
    """Unsigned magnitudes per op (empty: the op takes none), as in torchvision's `_AUGMENTATION_SPACE`."""
    wide = policy == "trivialaugment"
    shear, color = (0.99, 0.99) if wide else (0.3, 0.9)
    tx, ty = (32.0, 32.0) if wide else (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    rotate, posterize_div = (135.0, 6) if wide else (30.0, 4)
    lin = lambda hi: torch.linspace(0.0, hi, num_bins).tolist()  # noqa: E731
    table = {"ShearX": lin(shear), "ShearY": lin(shear), "TranslateX": lin(tx), "TranslateY": lin(ty)}
    table |= {"Rotate": lin(rotate), **{op: lin(color) for op in ("Brightness", "Color", "Contrast", "Sharpness")}}
    table["Posterize"] = (8 - (torch.arange(num_bins) / ((num_bins - 1) / posterize_div))).round().int().tolist()
    table["Solarize"] = torch.linspace(1.0, 0.0, num_bins).tolist()
    return table | {"Identity": [], "AutoContrast": [], "Equalize": []}


def reference_op(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """One op on one (1, C, H, W) uint8 image, with torchvision's public functional API (NEAREST, fill 0)."""
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, interpolation=nearest, fill=None, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        translate = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return TF.affine(image, 0.0, translate, 1.0, [0.0, 0.0], interpolation=nearest, fill=None)
    if name == "Rotate":
        return TF.rotate(image, m, interpolation=nearest, fill=None)
    colour = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast}
    if name in colour or name == "Sharpness":
        return (colour.get(name) or TF.adjust_sharpness)(image, 1.0 + m)
    if name == "Posterize":
        return TF.posterize(image, int(m))
    if name == "Solarize":
        return TF.solarize(image, 255.0 * m)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize}[name](image)


def random_images(n: int, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", POLICIES)
def test_copies_of_one_image_get_their_own_ops(policy):
    # torchvision's RandAugment on a 4-D batch gives all 64 copies the same op; here each copy draws its own
    copies = random_images(1).expand(64, -1, -1, -1).contiguous()
    out = auto_augment(copies, policy, generator=seeded(0))
    distinct = {bytes(image.numpy()) for image in out}
    assert len(distinct) >= 20, f"only {len(distinct)} distinct results from 64 copies"
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[1], out[2])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_device_kept(policy, channels):
    images = random_images(10, c=channels, h=12, w=20)
    out = auto_augment(images, policy, generator=seeded(1))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    assert not torch.equal(out, images)


def test_no_ops_is_the_identity():
    images = random_images(8)
    assert torch.equal(auto_augment(images, "randaugment", num_ops=0, generator=seeded(0)), images)
    empty = random_images(0)
    assert auto_augment(empty, "trivialaugment", generator=seeded(0)).shape == empty.shape


@pytest.mark.parametrize("policy", POLICIES)
def test_same_seed_same_output(policy):
    images = random_images(32)
    first = auto_augment(images, policy, generator=seeded(7))
    assert torch.equal(first, auto_augment(images, policy, generator=seeded(7)))
    assert not torch.equal(first, auto_augment(images, policy, generator=seeded(8)))


@pytest.mark.parametrize(
    "policy, num_ops, magnitude, bins, batch",
    [
        ("randaugment", 2, 9, 31, 64),  # the defaults: many images share a group
        ("randaugment", 3, 30, 31, 48),  # the strongest magnitude, three ops in a row
        ("trivialaugment", 1, 9, 31, 128),  # the defaults: mostly one image per group
        ("trivialaugment", 1, 9, 3, 64),  # few bins: groups of several images
    ],
)
def test_each_image_gets_its_drawn_ops_exactly(policy, num_ops, magnitude, bins, batch):
    """auto_augment == the reference op chain on each image alone, for the draws `_draw` makes with that seed."""
    images = random_images(batch, h=16, w=20)
    names = [name for name, _, _ in augment._torchvision_policy(policy)[0]]
    assert set(names) == ALL_OPS
    ops, mags = augment._draw(policy, batch, 16, 20, num_ops, magnitude, bins, generator=seeded(3))
    out = auto_augment(images, policy, num_ops, magnitude, bins, generator=seeded(3))

    table = official_magnitudes(policy, bins, 16, 20)
    rounds = num_ops if policy == "randaugment" else 1
    assert ops.shape == mags.shape == (rounds, batch)
    drawn = set()
    for i in range(batch):
        expected = images[i : i + 1]
        for r in range(rounds):
            name, m = names[int(ops[r, i])], float(mags[r, i])
            drawn.add(name)
            # the magnitude is one of the official ones (RandAugment: at the chosen bin), signed only where it may be
            allowed = table[name] if policy == "trivialaugment" or not table[name] else [table[name][magnitude]]
            assert (abs(m) if name in SIGNED else m) in (allowed or [0.0]), (name, m)
            expected = reference_op(expected, name, m)
        assert torch.equal(out[i], expected[0]), f"image {i}: {[names[int(o)] for o in ops[:, i]]} {mags[:, i]}"
    assert drawn == ALL_OPS  # this seed exercises every op


@pytest.mark.parametrize("policy, bins", [("randaugment", 31), ("trivialaugment", 31), ("trivialaugment", 4)])
def test_every_result_is_one_op_of_the_space_on_that_image(policy, bins):
    """Black box (no internals): each output is the reference of some (op, magnitude, sign) on its own input."""
    images = random_images(8, h=12, w=12, seed=5)
    out = auto_augment(images, policy, num_ops=1, magnitude=bins - 1, num_magnitude_bins=bins, generator=seeded(4))
    table = official_magnitudes(policy, bins, 12, 12)
    for i in range(len(images)):
        image = images[i : i + 1]
        candidates = set()
        for name, values in table.items():
            values = values if policy == "trivialaugment" or not values else [values[bins - 1]]
            for v in values or [0.0]:
                for m in {v, -v} if name in SIGNED else {v}:
                    candidates.add(bytes(reference_op(image, name, float(m)).numpy()))
        assert bytes(out[i : i + 1].numpy()) in candidates, f"image {i} is no op of the {policy} space"


@pytest.mark.parametrize("policy", POLICIES)
def test_draws_are_uniform_over_ops_and_signs(policy):
    ops, mags = augment._draw(policy, 28_000, 32, 32, 1, 9, 31, generator=seeded(0))
    names = [name for name, _, _ in augment._torchvision_policy(policy)[0]]
    share = torch.bincount(ops[0], minlength=len(names)).double() / ops.shape[1]
    assert (share - 1 / len(names)).abs().max() < 0.01, share
    signed = torch.tensor([names[o] in SIGNED for o in ops[0].tolist()]) & (mags[0] != 0)
    negative = (mags[0][signed] < 0).double().mean()
    assert abs(negative - 0.5) < 0.02, negative


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(policy="autoaugment"),
            "unknown auto-augment policy 'autoaugment'; policies: randaugment, trivialaugment",
        ),
        (dict(policy="randaugment", num_ops=-1), "num_ops must be a non-negative integer, got -1"),
        (dict(policy="randaugment", magnitude=31), r"magnitude must be an integer in \[0, 30\]"),
        (dict(policy="randaugment", magnitude=-1), r"magnitude must be an integer in \[0, 30\]"),
        (dict(policy="randaugment", magnitude=5, num_magnitude_bins=5), r"in \[0, 4\]"),
        (dict(policy="trivialaugment", num_magnitude_bins=1), "num_magnitude_bins must be an integer of at least 2"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        auto_augment(random_images(2), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_images_are_user_errors():
    with pytest.raises(UserError, match="uint8"):
        auto_augment(random_images(2).float(), "randaugment")
    with pytest.raises(UserError, match="channels"):
        auto_augment(random_images(2, c=4), "randaugment")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_batch_stays_on_the_device(policy):
    images = random_images(64).cuda()
    out = auto_augment(images, policy, generator=torch.Generator("cuda").manual_seed(0))
    again = auto_augment(images, policy, generator=torch.Generator("cuda").manual_seed(0))
    assert out.device == images.device and out.dtype == torch.uint8 and torch.equal(out, again)
    assert auto_augment(images, policy).device == images.device  # draws from the global CPU generator

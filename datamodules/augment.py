"""Batched training augmentation on whole uint8 tensors, on whatever device the batch lives on.

Per-sample PIL transforms in worker processes starve a GPU on 32-px images (a torchvision-style loader
delivers ~13-21k img/s; the edge ViT trains at ~47k img/s on an H100). Cropping and flipping a whole
batch with index arithmetic costs almost nothing on the device, so the DataModule applies this in
`on_after_batch_transfer`, after the batch reached the training device.

`auto_augment` adds RandAugment and TrivialAugment (wide) on the same batches, with torchvision's own ops and
augmentation space. Two choices make it both right and fast:

- Drawn per image. torchvision's `v2.RandAugment` given a 4-D batch draws ONE op and magnitude for the whole
  batch: every image of a step gets the same distortion, which is a different (and weaker) regulariser than the
  published per-image recipe. Here every image draws its own op(s), magnitude bin (TrivialAugment) and sign.
- Applied per group. A Python loop over images would call the op kernels B times per step (slow on a CPU, and on
  a GPU a launch-bound trickle). Images that drew the same (op, magnitude, sign) are gathered and transformed in
  ONE batched call, then written back by index, so the number of op calls per round is bounded by the number of
  distinct draws (RandAugment: at most 23; TrivialAugment with 31 bins: at most 590), not by the batch size.
  Every torchvision op used here works image by image inside a batch (per-image histograms, means, grids), so a
  batched call gives exactly what the same op gives each image alone (tests/test_augment.py checks this).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

from askexpert.errors import UserError

AUTO_AUGMENT_POLICIES = ("randaugment", "trivialaugment")


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding (the CIFAR recipe) and horizontal flip, independently per image.

    `images` is (B, C, H, W) of any dtype; the result has the same shape and dtype. Each image is padded by
    `padding` on every side and a window of the original size is cut at a uniformly random offset in
    [0, 2 * padding] on each axis; with `flip`, each image is mirrored with probability 0.5.
    """
    b, c, h, w = images.shape
    device = images.device
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
        rows = dy[:, None] + torch.arange(h, device=device)  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=device)  # (B, W)
        # two gathers (rows, then columns) of broadcast index views: the same pixels as one 4-index advanced
        # indexing, without materialising a (B, C, H, W) index (~30 % faster on a CPU)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
        out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if flip:
        mirrored = torch.rand(b, device=device, generator=generator) < 0.5
        out = torch.where(mirrored[:, None, None, None], out.flip(-1), out)
    return out


# what torchvision versions `_torchvision_policy` was checked against (its private names may move in others)
_CHECKED_TORCHVISION = "0.29.1"

OpFn = Callable[[torch.Tensor, str, float], torch.Tensor]
MagnitudesFn = Callable[[int, int, int], torch.Tensor | None]


@cache
def _torchvision_policy(policy: str) -> tuple[tuple[tuple[str, MagnitudesFn, bool], ...], OpFn]:
    """torchvision's augmentation space for `policy` and a function applying one of its ops to a uint8 batch.

    The one place that touches torchvision's private API, on purpose: the public `v2.RandAugment` /
    `v2.TrivialAugmentWide` draw one op per call, and re-implementing the 14 ops and their magnitude tables here
    would let them drift from what everybody calls RandAugment. `_AUGMENTATION_SPACE` (op name -> (magnitudes
    for (num_bins, height, width), signed)) and `_apply_image_or_video_transform` (the op on a tensor, with the
    transform's default NEAREST interpolation and fill 0) are what the classes' own `forward` uses. Checked with
    torchvision 0.29.1; a torchvision without these names stops here with a clear message.
    """
    from torchvision.transforms import v2

    cls = v2.RandAugment if policy == "randaugment" else v2.TrivialAugmentWide
    transform = cls()  # torchvision's defaults: interpolation NEAREST, fill None (0)
    space = getattr(cls, "_AUGMENTATION_SPACE", None)
    apply = getattr(transform, "_apply_image_or_video_transform", None)
    fill = getattr(transform, "_fill", None)
    if not isinstance(space, dict) or apply is None or fill is None:
        import torchvision

        raise UserError(
            f"auto-augment needs torchvision's {cls.__name__}._AUGMENTATION_SPACE and _apply_image_or_video_transform"
            f" (checked with torchvision {_CHECKED_TORCHVISION}), which torchvision {torchvision.__version__} lacks;"
            f" install torchvision {_CHECKED_TORCHVISION} or leave auto-augment off"
        )

    def apply_op(images: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
        return apply(images, name, magnitude, interpolation=transform.interpolation, fill=fill)

    return tuple((name, fn, bool(signed)) for name, (fn, signed) in space.items()), apply_op


@lru_cache(maxsize=64)
def _magnitude_table(policy: str, num_bins: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ops, bins) float64 magnitudes (0 for ops without one) and (ops,) bool "the sign is drawn", on the CPU."""
    space, _ = _torchvision_policy(policy)
    table = torch.zeros(len(space), num_bins, dtype=torch.float64)
    signed = torch.zeros(len(space), dtype=torch.bool)
    for i, (_, magnitudes_fn, is_signed) in enumerate(space):
        magnitudes = magnitudes_fn(num_bins, height, width)
        if magnitudes is not None:  # float32 (or int) -> float64 is exact: the same floats torchvision uses
            table[i] = magnitudes.to(torch.float64)
            signed[i] = is_signed
    return table, signed


def _check_arguments(images: torch.Tensor, policy: str, num_ops: int, magnitude: int, num_magnitude_bins: int) -> None:
    if policy not in AUTO_AUGMENT_POLICIES:
        raise UserError(f"unknown auto-augment policy {policy!r}; policies: {', '.join(AUTO_AUGMENT_POLICIES)}")
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
        raise UserError(f"auto-augment num_ops must be a non-negative integer, got {num_ops!r}")
    if isinstance(num_magnitude_bins, bool) or not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
        raise UserError(f"auto-augment num_magnitude_bins must be an integer of at least 2, got {num_magnitude_bins!r}")
    if policy == "randaugment" and (
        isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude <= num_magnitude_bins - 1
    ):
        raise UserError(
            f"auto-augment magnitude must be an integer in [0, {num_magnitude_bins - 1}]"
            f" (num_magnitude_bins={num_magnitude_bins}), got {magnitude!r}"
        )
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
        what = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"auto-augment takes a uint8 (B, C, H, W) batch, got {what}")
    if images.shape[1] not in (1, 3):
        raise UserError(f"auto-augment takes 1- or 3-channel images, got {images.shape[1]} channels")


def _draw(
    policy: str,
    batch: int,
    height: int,
    width: int,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's draws: (rounds, batch) op indices into the policy's space and (rounds, batch) float64 magnitudes.

    Mirrors torchvision's `forward`, once per image instead of once per call: RandAugment draws `num_ops` rounds of
    a uniform op at the fixed `magnitude` bin; TrivialAugment one round of a uniform op and a uniform bin; a signed
    op's magnitude is negated with probability 1/2; ops without a magnitude get 0.0. Draws use `generator` on its
    own device (the global CPU generator when None, so a GPU batch needs no device sync for them) and come back on
    the CPU, where the grouping is done.
    """
    table, signed = _magnitude_table(policy, num_magnitude_bins, height, width)
    rounds = num_ops if policy == "randaugment" else 1
    device = generator.device if generator is not None else torch.device("cpu")
    ops = torch.randint(0, len(table), (rounds, batch), device=device, generator=generator)
    if policy == "randaugment":
        bins = torch.full((rounds, batch), magnitude, dtype=torch.long, device=device)
    else:
        bins = torch.randint(0, num_magnitude_bins, (rounds, batch), device=device, generator=generator)
    negate = torch.rand((rounds, batch), device=device, generator=generator) < 0.5
    ops, bins, negate = ops.cpu(), bins.cpu(), negate.cpu()
    magnitudes = table[ops, bins]
    magnitudes = torch.where(negate & signed[ops], -magnitudes, magnitudes)
    return ops, magnitudes


def auto_augment(
    images: torch.Tensor,
    policy: str,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandAugment or TrivialAugment (wide) on a uint8 (B, C, H, W) batch, drawn per image, applied per group.

    `policy` is "randaugment" (`num_ops` ops in a row per image, each uniform over torchvision's 14, at bin
    `magnitude` of `num_magnitude_bins`) or "trivialaugment" (one op and a uniform magnitude bin per image;
    `num_ops` and `magnitude` are not used). The ops, magnitude tables, NEAREST interpolation and fill 0 are
    torchvision's (`torchvision.transforms.v2.RandAugment` / `TrivialAugmentWide`). Draws come from `generator`
    (on its own device) or the global CPU generator. The result is uint8 of the same shape on the same device;
    with nothing to do (no ops, an empty batch) it is `images` itself.
    """
    _check_arguments(images, policy, num_ops, magnitude, num_magnitude_bins)
    b, _, h, w = images.shape
    space, apply_op = _torchvision_policy(policy)
    ops, magnitudes = _draw(policy, b, h, w, num_ops, magnitude, num_magnitude_bins, generator)
    out = images
    if b == 0:
        return out
    for r in range(ops.shape[0]):
        # one group per distinct (op, signed magnitude); order lists the images group by group
        keys = torch.stack([ops[r].to(torch.float64), magnitudes[r]], dim=1)
        groups, group_of = torch.unique(keys, dim=0, return_inverse=True)
        order = torch.argsort(group_of, stable=True)
        counts = torch.bincount(group_of, minlength=len(groups)).tolist()
        # from pinned memory the index copy is asynchronous; a pageable one would wait for every queued kernel
        order_dev = order.pin_memory().to(out.device, non_blocking=True) if out.is_cuda else order
        chunks = out.index_select(0, order_dev).split(counts)
        results = []
        for (op, mag), chunk in zip(groups.tolist(), chunks, strict=True):
            name = space[int(op)][0]
            results.append(chunk if name == "Identity" else apply_op(chunk, name, mag))
        out = torch.empty_like(out).index_copy_(0, order_dev, torch.cat(results))
    return out

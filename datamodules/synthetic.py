"""Built-in offline stand-in for CIFAR-100: a deterministic synthetic data set with its shape and hierarchy.

Why it looks the way it does (everything in the framework is developed on it, and it is frozen once results
depend on it):

* **Superclass = object kind.** Each of the 20 superclasses defines a layout of four soft parts (a textured
  body, a head, a thin limb, a small accent), each part's shape (diamond ... rounded box, some heads are rings),
  a colour palette, a background tint and the base frequency / orientation of the body's stripe texture.
  Five sibling classes share all of that, so a model that learns the superclass gets most of the way.
* **Fine class = subtle cue vector.** Siblings differ only in a 4-d cue: stripe frequency, stripe angle relative
  to the body axis, head aspect ratio and accent colour. The five class centres are the vertices of a regular
  simplex (a random rotation per superclass), so every pair of siblings is equally far apart.
* **Siblings overlap.** Every image draws its own cue vector around its class centre with noise comparable to
  the distance between centres, so even the exact cues identify the fine class only 84 % of the time
  (`fine_accuracy_ceiling`). No amount of data or capacity gets a model to 100 %.
* **Every image is a new instance.** Position, scale, rotation, mirroring, stripe phase and contrast, colour
  jitter, background colour / gradient / low-frequency blotches, an optional distractor blob and pixel noise are
  drawn per image. Mirroring is part of the distribution, so horizontal-flip augmentation stays in-distribution.

Determinism: the "world" (layouts, palettes, cue centres) is fixed by a constant, so class names mean the same
thing for every `seed`; `seed` picks the sample. Random numbers come from one torch generator per
(seed, split, class, chunk of `_CHUNK` images), so the train split never depends on `test_per_class` (and vice
versa), and growing a split only appends images: image j of class c sits at row `j * 100 + c`, so a smaller
split is a prefix of a larger one. Instance parameters are drawn before any pixel noise, so `image_size` only
changes the rendering resolution, not the instances. Outputs are bit-identical for the same torch version on
the same kind of CPU (torch's generators and vectorised maths set that scope); the world avoids LAPACK, so
what each class looks like does not depend on the BLAS build.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from askexpert.errors import UserError
from datamodules.labels import CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE
from datamodules.splits import ImageSplits

_WORLD_SEED = 1_000_003  # fixes layouts, palettes and cue centres; never derived from the user's seed
_CHUNK = 25  # images per random stream; a split renders whole chunks, so small sizes waste little
_CLASS_BLOCK = 4  # classes rendered together: 100 images per batch stay in cache, which is what makes it fast
_NUM_PARTS = 4  # drawn in this order: limb, body, head, accent
_LIMB, _BODY, _HEAD, _ACCENT = range(_NUM_PARTS)
_CUE_DIMS = 4  # stripe frequency, stripe angle, head aspect, accent colour
_CUE_SPACING = 1.6  # distance between sibling cue centres (in cue units)
_CUE_NOISE = 0.5  # per-image cue noise; with the spacing above, the exact-cue Bayes accuracy is 0.84
# generator stream per split: "stream" is the unlabelled deployment stream of `adapt` (askexpert/adapt/stream.py),
# another stream of the same world, so it never repeats a training or test image; train and test keep their keys
_SPLITS = {"train": 0, "test": 1, "stream": 2}


def synthetic_metadata() -> tuple[list[str], list[str], list[int]]:
    """(class_names, superclass_names, class_to_superclass) of the stand-in, without generating any image."""
    return list(CIFAR100_FINE_NAMES), list(CIFAR100_COARSE_NAMES), list(CIFAR100_FINE_TO_COARSE)


def make_synthetic(
    train_per_class: int = 500, test_per_class: int = 100, seed: int = 0, image_size: int = 32
) -> ImageSplits:
    """Generate the stand-in: `train_per_class` / `test_per_class` images of each of the 100 classes.

    Rows are ordered image-major (row `j * 100 + c` is image j of class c), so every prefix of a split is
    class-balanced and a larger split extends a smaller one with the same seed.
    """
    _check_args(train_per_class=train_per_class, test_per_class=test_per_class, seed=seed, image_size=image_size)
    class_names, superclass_names, class_to_superclass = synthetic_metadata()
    _world()  # build the cached world once, before worker threads need it
    with _one_thread_per_worker() as workers, ThreadPoolExecutor(workers) as pool:
        train_images, train_labels = _make_split("train", train_per_class, seed, image_size, pool)
        test_images, test_labels = _make_split("test", test_per_class, seed, image_size, pool)
    return ImageSplits(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        superclass_names=superclass_names,
        class_to_superclass=class_to_superclass,
        stand_in=True,
    )


def make_synthetic_stream(per_class: int, seed: int = 0, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of `per_class` images per class of the "stream" split: the deployment stream that
    `python -m askexpert adapt` simulates. Same classes and distribution as `make_synthetic(seed=seed)`, drawn
    from generator streams of their own, so no stream image is a training or test image. Image-major like the
    other splits (a larger stream extends a smaller one)."""
    _check_args(train_per_class=1, test_per_class=1, seed=seed, image_size=image_size)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"make_synthetic_stream: per_class must be a positive int, got {per_class!r}")
    _world()
    with _one_thread_per_worker() as workers, ThreadPoolExecutor(workers) as pool:
        return _make_split("stream", per_class, seed, image_size, pool)


def fine_accuracy_ceiling(samples_per_class: int = 2000, seed: int = 0) -> float:
    """Monte-Carlo Bayes accuracy of the fine class given the superclass and the image's exact cue vector.

    Pixels are a function of the cues plus class-independent nuisances, so no model can beat this number on
    average; it documents how much sibling classes overlap by design.
    """
    world = _world()
    gen = torch.Generator().manual_seed(seed)
    centres = world.sibling_centre  # (S, 5, D)
    cues = centres.unsqueeze(2) + _CUE_NOISE * torch.randn(
        *centres.shape[:2], samples_per_class, _CUE_DIMS, generator=gen
    )
    # Equal priors and isotropic Gaussian noise: the Bayes rule is the nearest sibling centre.
    dist = torch.cdist(cues.flatten(1, 2), centres)  # (S, 5 * n, 5)
    truth = torch.arange(5).repeat_interleave(samples_per_class)
    return (dist.argmin(-1) == truth).float().mean().item()


def _check_args(**args: int) -> None:
    """Reject anything but plain ints in range, naming the argument, so typos fail before minutes of work."""
    for name, value in args.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"make_synthetic: {name} must be an int, got {type(value).__name__} {value!r}")
    for name in ("train_per_class", "test_per_class"):
        if args[name] < 1:
            raise UserError(f"make_synthetic: {name} must be a positive int, got {args[name]}")
    if args["seed"] < 0:
        raise UserError(f"make_synthetic: seed must be a non-negative int, got {args['seed']}")
    if args["image_size"] < 16:
        raise UserError(f"make_synthetic: image_size must be at least 16 pixels, got {args['image_size']}")


# ----------------------------------------------------------------------------------------------------------
# The fixed world: what each superclass looks like and where each fine class sits in cue space.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    """Per-superclass layout / palette tables (first dim 20) and per-class cue centres (first dim 100)."""

    part_offset: torch.Tensor  # (S, P, 2) part centre in object units
    part_radii: torch.Tensor  # (S, P, 2) half-axes
    part_angle: torch.Tensor  # (S, P) part rotation in the object frame
    part_power: torch.Tensor  # (S, P) superellipse exponent: 1 diamond, 2 ellipse, 4 rounded box
    part_hollow: torch.Tensor  # (S, P) inner radius of a ring (0 = filled)
    part_colour: torch.Tensor  # (S, P, 3) RGB in [0, 1]
    scene_colour: torch.Tensor  # (S, 3) background tint
    stripe_freq: torch.Tensor  # (S,) base stripe frequency, cycles per object unit
    stripe_angle: torch.Tensor  # (S,) base stripe angle to the body axis, radians
    accent_dir: torch.Tensor  # (S, 3) unit RGB direction along which the accent colour cue moves
    sibling_centre: torch.Tensor  # (S, 5, D) the five class centres of each superclass, in cue space
    cue_centre: torch.Tensor  # (C, D) the same centres indexed by fine class id


@lru_cache(maxsize=1)
def _world() -> _World:
    """Build the frozen world from `_WORLD_SEED` (cached: it is tiny and identical for every call)."""
    gen = torch.Generator().manual_seed(_WORLD_SEED)
    num_super = len(CIFAR100_COARSE_NAMES)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=gen)

    offset = torch.zeros(num_super, _NUM_PARTS, 2)
    radii = torch.zeros(num_super, _NUM_PARTS, 2)
    angle = torch.zeros(num_super, _NUM_PARTS)
    power = uniform(1.0, 4.0, num_super, _NUM_PARTS)
    hollow = torch.zeros(num_super, _NUM_PARTS)

    radii[:, _BODY] = torch.stack([uniform(0.38, 0.55, num_super), uniform(0.22, 0.36, num_super)], -1)
    body_reach = radii[:, _BODY].mean(-1)
    head_dir = uniform(0.0, 2 * math.pi, num_super)
    offset[:, _HEAD] = _polar(head_dir, body_reach * uniform(0.95, 1.2, num_super))
    radii[:, _HEAD] = uniform(0.14, 0.24, num_super, 2)
    angle[:, _HEAD] = uniform(0.0, math.pi, num_super)
    hollow[:, _HEAD] = torch.where(torch.rand(num_super, generator=gen) < 0.3, 0.45, 0.0)
    limb_dir = head_dir + math.pi + uniform(-1.2, 1.2, num_super)
    offset[:, _LIMB] = _polar(limb_dir, body_reach * uniform(0.7, 1.1, num_super))
    radii[:, _LIMB] = torch.stack([uniform(0.28, 0.45, num_super), uniform(0.05, 0.08, num_super)], -1)
    angle[:, _LIMB] = limb_dir + uniform(-0.6, 0.6, num_super)
    offset[:, _ACCENT] = _polar(uniform(0.0, 2 * math.pi, num_super), uniform(0.0, 0.25, num_super))
    radii[:, _ACCENT] = uniform(0.1, 0.15, num_super, 2)

    part_colour = _hsv_to_rgb(
        uniform(0, 1, num_super, _NUM_PARTS),
        uniform(0.35, 0.9, num_super, _NUM_PARTS),
        uniform(0.35, 0.95, num_super, _NUM_PARTS),
    )
    # Body hues are spread evenly over the colour wheel (in shuffled order) and kept saturated and bright: the
    # body colour is the most robust superclass cue, which is what makes the superclass much easier than the class.
    slot = torch.argsort(torch.rand(num_super, generator=gen)).float()  # a random permutation of 0..S-1
    body_hue = (slot + uniform(-0.2, 0.2, num_super)) / num_super
    part_colour[:, _BODY] = _hsv_to_rgb(body_hue % 1, uniform(0.55, 0.9, num_super), uniform(0.6, 0.95, num_super))
    # The accent colour moves with the cue, so keep its base away from the clipping edges.
    part_colour[:, _ACCENT] = uniform(0.35, 0.65, num_super, 3)
    scene = _hsv_to_rgb(uniform(0, 1, num_super), uniform(0.2, 0.7, num_super), uniform(0.3, 0.9, num_super))
    accent_dir = F.normalize(torch.randn(num_super, 3, generator=gen), dim=-1)

    siblings = _sibling_centres(gen, num_super)
    return _World(
        part_offset=offset,
        part_radii=radii,
        part_angle=angle,
        part_power=power,
        part_hollow=hollow,
        part_colour=part_colour,
        scene_colour=scene,
        stripe_freq=uniform(2.4, 3.0, num_super),
        stripe_angle=uniform(0.6, 1.0, num_super),
        accent_dir=accent_dir,
        sibling_centre=siblings,
        cue_centre=_class_centres(siblings),
    )


def _sibling_centres(gen: torch.Generator, num_super: int) -> torch.Tensor:
    """Five sibling centres per superclass: a regular 4-simplex with edge `_CUE_SPACING`, randomly rotated."""
    simplex = torch.eye(5, dtype=torch.float64) - 1.0 / 5  # 5 points in the plane sum(x) = 0, pairwise sqrt(2)
    plane = _gram_schmidt(torch.cat([torch.ones(1, 5), torch.eye(5)[:4]]).double())[1:]  # (4, 5) basis of it
    simplex = simplex @ plane.T * (_CUE_SPACING / math.sqrt(2.0))  # (5, 4), centred on 0
    rotations = torch.stack(
        [_gram_schmidt(torch.randn(_CUE_DIMS, _CUE_DIMS, generator=gen).double()) for _ in range(num_super)]
    )
    return (simplex @ rotations).float()  # (S, 5, D)


def _gram_schmidt(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the rows in order. Plain arithmetic rather than LAPACK's QR, whose sign conventions may
    differ between builds: the world, and so what each class looks like, must not depend on the machine."""
    out: list[torch.Tensor] = []
    for row in rows:
        for done in out:
            row = row - (row @ done) * done
        out.append(row / row.norm())
    return torch.stack(out)


def _class_centres(siblings: torch.Tensor) -> torch.Tensor:
    """(C, D) centre of each fine class: the k-th class of superclass s (in CIFAR id order) gets sibling k."""
    out = torch.zeros(len(CIFAR100_FINE_NAMES), _CUE_DIMS)
    for s in range(len(siblings)):
        members = [c for c, sup in enumerate(CIFAR100_FINE_TO_COARSE) if sup == s]
        out[members] = siblings[s]
    return out


def _polar(angle: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB (all in [0, 1]); palettes are drawn in HSV so they are saturated and varied."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h.unsqueeze(-1) * 6) % 6
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Per-image instance parameters: one generator per (seed, split, class, chunk).
# ----------------------------------------------------------------------------------------------------------

# Layout of the per-image uniform draws (columns of a (chunk, _NUM_UNIFORM) tensor).
_U = {
    name: i
    for i, name in enumerate(
        "cx cy scale rot mirror phase contrast gain bg_mix bg_angle bg_strength bg_sign blotch_amp noise_amp "
        "distractor dx dy da db dpow dangle bg_r bg_g bg_b dcol_r dcol_g dcol_b".split()
    )
}
_NUM_NORMAL = _CUE_DIMS + 3 + 3 + _NUM_PARTS * 3  # cues, channel gain, channel offset, part colour jitter
_BLOTCH = 4  # low-frequency background blotches: a 4x4 grid upsampled to the image


@contextmanager
def _one_thread_per_worker() -> Iterator[int]:
    """Render with N Python threads of single-threaded torch ops instead of N-thread ops on small batches.

    Yields N (torch's current thread count) and restores it afterwards. Measured on 2 cores: about as fast as
    2-thread ops when the machine is idle, but OpenMP's 2-thread ops slowed generation down ~50x whenever
    another process held a core, while independent single-threaded workers just share what is free.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, previous)
    finally:
        torch.set_num_threads(previous)


def _make_split(
    split: str, per_class: int, seed: int, image_size: int, pool: ThreadPoolExecutor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of one split in image-major order, rendered in fixed blocks of streams.

    A render batch is always the full chunks `k` of the same `_CLASS_BLOCK` classes, truncated only after
    rendering, so every image is computed by exactly the same operations on the same shapes whatever the split
    size: vectorised and scalar transcendental kernels may differ in the last bit, and this keeps a smaller
    split a bit-exact prefix of a larger one. Blocks write disjoint rows, so workers need no locking.
    """
    num_classes = len(CIFAR100_FINE_NAMES)
    images = torch.empty(per_class * num_classes, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.arange(num_classes).repeat(per_class)

    def render_block(k: int, first: int) -> None:
        count = min(_CHUNK, per_class - k * _CHUNK)
        classes = torch.arange(first, min(first + _CLASS_BLOCK, num_classes))
        draws = [_draw_stream(_stream_seed(seed, _SPLITS[split], int(c), k), image_size) for c in classes]
        batch = {name: torch.cat([d[name] for d in draws]) for name in draws[0]}
        rendered = _render(batch, classes.repeat_interleave(_CHUNK), image_size)
        rendered = rendered.view(len(classes), _CHUNK, 3, image_size, image_size)[:, :count]
        rows = torch.arange(k * _CHUNK, k * _CHUNK + count).view(1, -1) * num_classes + classes.view(-1, 1)
        images[rows.flatten()] = rendered.flatten(0, 1)

    blocks = [(k, first) for k in range(-(-per_class // _CHUNK)) for first in range(0, num_classes, _CLASS_BLOCK)]
    for future in [pool.submit(render_block, k, first) for k, first in blocks]:
        future.result()  # re-raises a worker's exception here
    return images, labels


def _draw_stream(stream_seed: int, image_size: int) -> dict[str, torch.Tensor]:
    """The random numbers of one chunk of `_CHUNK` images; always drawn in full so prefixes never change."""
    gen = torch.Generator().manual_seed(stream_seed)
    # Instance parameters first, pixel noise last: the instances never depend on the image size.
    return {
        "u": torch.rand(_CHUNK, len(_U), generator=gen),
        "n": torch.randn(_CHUNK, _NUM_NORMAL, generator=gen),
        "blotch": torch.rand(_CHUNK, 3, _BLOTCH, _BLOTCH, generator=gen),
        "pixel": torch.randn(_CHUNK, 3, image_size, image_size, generator=gen),
    }


def _stream_seed(*keys: int) -> int:
    """Mix integer keys into a 63-bit seed (splitmix64 steps), so neighbouring keys give unrelated streams."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for key in keys:
        state = (state ^ (key & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 30)) * 0x94D049BB133111EB & mask
        state ^= state >> 31
    return state >> 1


# ----------------------------------------------------------------------------------------------------------
# Rendering: everything vectorised over a batch of images.
# ----------------------------------------------------------------------------------------------------------


def _render(draw: dict[str, torch.Tensor], labels: torch.Tensor, image_size: int) -> torch.Tensor:
    """Render a batch: background, distractor, the four object parts, colour jitter, noise -> uint8."""
    world = _world()
    u, n = draw["u"], draw["n"]
    sup = torch.tensor(CIFAR100_FINE_TO_COARSE)[labels]
    cues = world.cue_centre[labels] + _CUE_NOISE * n[:, :_CUE_DIMS]
    px = 2.0 / image_size  # one pixel in image units ([-1, 1] across)
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) * px - 1.0
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)

    canvas = _background(u, draw["blotch"], world.scene_colour[sup], grid_x, grid_y)
    canvas = _draw_distractor(canvas, u, grid_x, grid_y, px)

    # Object frame: translate, rotate, scale, mirror. Shapes are defined in these object units.
    scale = 1.15 * torch.exp(0.3 * u[:, _U["scale"]] - 0.15)
    rot = 0.45 * (2 * u[:, _U["rot"]] - 1)
    mirror = torch.where(u[:, _U["mirror"]] < 0.5, -1.0, 1.0)
    dx = grid_x - (0.44 * u[:, _U["cx"]] - 0.22).view(-1, 1, 1)
    dy = grid_y - (0.44 * u[:, _U["cy"]] - 0.22).view(-1, 1, 1)
    cos, sin = torch.cos(rot).view(-1, 1, 1), torch.sin(rot).view(-1, 1, 1)
    obj_x = (cos * dx + sin * dy) / scale.view(-1, 1, 1) * mirror.view(-1, 1, 1)
    obj_y = (-sin * dx + cos * dy) / scale.view(-1, 1, 1)
    obj_px = px / scale  # one pixel in object units, per image

    colours = world.part_colour[sup] + 0.04 * n[:, -_NUM_PARTS * 3 :].view(-1, _NUM_PARTS, 3)
    colours[:, _ACCENT] += 0.35 * cues[:, 3:4] * world.accent_dir[sup]
    radii = world.part_radii[sup].clone()
    aspect = torch.exp2(0.6 * cues[:, 2])  # head aspect cue: stretch one axis, squeeze the other
    radii[:, _HEAD] *= torch.stack([aspect, 1 / aspect], -1)

    for part in range(_NUM_PARTS):
        alpha = _part_alpha(
            obj_x,
            obj_y,
            world.part_offset[sup, part],
            radii[:, part],
            world.part_angle[sup, part],
            world.part_power[sup, part],
            world.part_hollow[sup, part],
            obj_px,
        )
        colour = colours[:, part].clamp(0, 1).view(-1, 3, 1, 1)
        if part == _BODY:
            colour = colour * _stripes(obj_x, obj_y, u, cues, world.stripe_freq[sup], world.stripe_angle[sup])
        canvas = torch.lerp(canvas, colour, alpha.unsqueeze(1))

    return _finish(canvas, u, n, draw["pixel"])


def _background(
    u: torch.Tensor, blotch: torch.Tensor, scene: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor
) -> torch.Tensor:
    """A random colour pulled towards the superclass tint, a linear gradient and low-frequency blotches."""
    random_colour = u[:, [_U["bg_r"], _U["bg_g"], _U["bg_b"]]]
    mix = (0.3 + 0.5 * u[:, _U["bg_mix"]]).unsqueeze(-1)
    base = (mix * scene + (1 - mix) * random_colour).view(-1, 3, 1, 1)
    angle = 2 * math.pi * u[:, _U["bg_angle"]]
    ramp = torch.cos(angle).view(-1, 1, 1) * grid_x + torch.sin(angle).view(-1, 1, 1) * grid_y  # in [-1.4, 1.4]
    strength = (0.25 * u[:, _U["bg_strength"]] * torch.where(u[:, _U["bg_sign"]] < 0.5, -1.0, 1.0)).view(-1, 1, 1)
    upsample = _upsampler(grid_x.shape[-1])
    blotches = upsample @ (blotch - 0.5) @ upsample.T
    return base * (1 + strength * ramp).unsqueeze(1) + 0.3 * u[:, _U["blotch_amp"]].view(-1, 1, 1, 1) * blotches


@lru_cache(maxsize=8)
def _upsampler(size: int) -> torch.Tensor:
    """(size, _BLOTCH) bicubic interpolation matrix: two small matmuls instead of a slow `interpolate` call."""
    eye = torch.eye(_BLOTCH).view(_BLOTCH, 1, _BLOTCH, 1)
    return F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=False).view(_BLOTCH, size).T


def _draw_distractor(
    canvas: torch.Tensor, u: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor, px: float
) -> torch.Tensor:
    """Half the images get a random blob behind the object, so 'something else in view' is no class cue."""
    centre = torch.stack([1.6 * u[:, _U["dx"]] - 0.8, 1.6 * u[:, _U["dy"]] - 0.8], -1)
    radii = torch.stack([0.08 + 0.2 * u[:, _U["da"]], 0.08 + 0.2 * u[:, _U["db"]]], -1)
    alpha = _part_alpha(
        grid_x,
        grid_y,
        centre,
        radii,
        math.pi * u[:, _U["dangle"]],
        1 + 3 * u[:, _U["dpow"]],
        torch.zeros(len(u)),
        torch.full((len(u),), px),
    )
    alpha = alpha * (u[:, _U["distractor"]] < 0.5).float().view(-1, 1, 1)
    colour = u[:, [_U["dcol_r"], _U["dcol_g"], _U["dcol_b"]]].view(-1, 3, 1, 1)
    return torch.lerp(canvas, colour, alpha.unsqueeze(1))


def _part_alpha(
    x: torch.Tensor,
    y: torch.Tensor,
    offset: torch.Tensor,
    radii: torch.Tensor,
    angle: torch.Tensor,
    power: torch.Tensor,
    hollow: torch.Tensor,
    pixel: torch.Tensor,
) -> torch.Tensor:
    """Anti-aliased coverage (B, H, W) of a rotated superellipse (optionally a ring) given per-image shapes.

    The edge is a linear ramp about one pixel wide, which keeps shapes smooth without supersampling. It works
    on s = r**p (r = 1 on the outline) and uses (1 - s) / p ~ 1 - r near the edge, which saves a `pow`.
    """
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    dx, dy = x - offset[:, 0].view(-1, 1, 1), y - offset[:, 1].view(-1, 1, 1)
    a, b = radii[:, 0].view(-1, 1, 1), radii[:, 1].view(-1, 1, 1)
    p = power.view(-1, 1, 1)
    qx, qy = (cos * dx + sin * dy) / a, (-sin * dx + cos * dy) / b
    s = torch.exp(p * torch.log(qx.abs())) + torch.exp(p * torch.log(qy.abs()))  # r ** p
    ramp = torch.minimum(a, b) / pixel.view(-1, 1, 1)  # pixels per unit of r (along the short axis)
    alpha = ((1 - s) * (ramp / p) + 0.5).clamp(0, 1)
    inner = hollow.view(-1, 1, 1)
    if not bool((inner > 0).any()):
        return alpha
    inner_s = inner.pow(p)  # the hole's edge, with d(r ** p) / dr = p * inner ** (p - 1) there
    hole = ((s - inner_s) * (ramp / (p * inner.clamp(min=1e-3).pow(p - 1))) + 0.5).clamp(0, 1)
    return torch.where(inner > 0, alpha * hole, alpha)


def _stripes(
    x: torch.Tensor,
    y: torch.Tensor,
    u: torch.Tensor,
    cues: torch.Tensor,
    base_freq: torch.Tensor,
    base_angle: torch.Tensor,
) -> torch.Tensor:
    """Brightness modulation (B, 1, H, W) of the body: frequency and angle carry two of the fine cues."""
    freq = (base_freq * torch.exp2(0.6 * cues[:, 0])).view(-1, 1, 1)
    angle = (base_angle + 0.6 * cues[:, 1]).view(-1, 1, 1)
    phase = (2 * math.pi * u[:, _U["phase"]]).view(-1, 1, 1)
    wave = torch.sin(2 * math.pi * freq * (torch.cos(angle) * x + torch.sin(angle) * y) + phase)
    contrast = (0.18 + 0.17 * u[:, _U["contrast"]]).view(-1, 1, 1)
    return (1 + contrast * wave).unsqueeze(1)


def _finish(canvas: torch.Tensor, u: torch.Tensor, n: torch.Tensor, pixel_noise: torch.Tensor) -> torch.Tensor:
    """Global and per-channel colour jitter, pixel noise, then quantise to uint8."""
    gain = (0.8 + 0.35 * u[:, _U["gain"]]).view(-1, 1, 1, 1)
    channel_gain = torch.exp(0.08 * n[:, _CUE_DIMS : _CUE_DIMS + 3]).view(-1, 3, 1, 1)
    offset = 0.05 * n[:, _CUE_DIMS + 3 : _CUE_DIMS + 6].view(-1, 3, 1, 1)
    noise_amp = (0.01 + 0.03 * u[:, _U["noise_amp"]]).view(-1, 1, 1, 1)
    out = canvas * gain * channel_gain + offset + noise_amp * pixel_noise
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)

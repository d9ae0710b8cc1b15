"""The images that arrive in deployment, cut into rounds: simulated from data no model trained on, or recorded.

- The synthetic stand-in: a freshly rendered "stream" split (`make_synthetic_stream`), another generator stream of
  the same world, so it never repeats a training, validation or test image.
- Any other source: the run's calibration split (`--data.calib_fraction` > 0), which no model trained on and no
  checkpoint was selected on. Without one there is nothing unseen to simulate from, and the user is told to pass
  a record or train with a calibration split.
- A record (`edge --record FILE`): the images a real edge offloaded, with the answers its experts gave.

Round r takes `round_size` images, and which images does not depend on how many rounds are asked for, so a
folder adapted for 2 rounds continues with round 3 on new images: a fixed pool (calibration split, record) is
shuffled once with the seed and read in consecutive slices; the synthetic stream is rendered image-major (every
100 consecutive rows hold one image per class, and a larger rendering extends a smaller one), so round r is the
next slice of rows, shuffled with (seed, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from askexpert.adapt.record import Record
from askexpert.errors import UserError
from askexpert.files.hashing import file_sha256
from datamodules.datamodule import ImageDataModule
from datamodules.synthetic import make_synthetic_stream

DEFAULT_ROUND_SIZE = 5000  # synthetic stream: images per round when --stream_size is not given (docs/adapt.md)


@dataclass(frozen=True)
class RoundImages:
    """One round's images, with the experts' recorded answers (a record) and the true labels where known (used
    only to report how often the kept soft labels are right, never to train)."""

    images: torch.Tensor  # uint8 (n, 3, S, S)
    soft_labels: torch.Tensor | None  # float32 (n, C): a record's expert answers; None when simulated
    labels: torch.Tensor | None


@dataclass(frozen=True)
class Stream:
    """A pool of images and the rule that hands round r its `round_size` of them."""

    kind: str  # "synthetic", "calib" or "record"
    description: str
    images: torch.Tensor
    labels: torch.Tensor | None
    soft_labels: torch.Tensor | None
    round_size: int
    seed: int
    identity: dict  # what adapt.json records about the stream

    def rows(self, r: int) -> torch.Tensor:
        """Pool rows of round r (1-based)."""
        first = (r - 1) * self.round_size
        if self.kind == "synthetic":  # image-major pool, rendered for exactly these rounds: shuffle within the round
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
            return first + torch.randperm(self.round_size, generator=generator)
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed))
        return order[first : first + self.round_size]

    def round(self, r: int) -> RoundImages:
        rows = self.rows(r)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return RoundImages(self.images[rows], pick(self.soft_labels), pick(self.labels))


def round_size(stream_size: int, rounds: int, pool: int | None, what: str) -> int:
    """Images per round for `stream_size` images in all, refused when a fixed pool of `pool` images is too small."""
    if stream_size < rounds:
        raise UserError(f"--stream_size {stream_size} is too small for --rounds {rounds} (at least one image a round)")
    if pool is not None and stream_size > pool:
        raise UserError(f"{what} has only {pool} images, fewer than --stream_size {stream_size}; lower --stream_size")
    return stream_size // rounds


def simulated_stream(datamodule: ImageDataModule, rounds: int, stream_size: int | None, seed: int) -> Stream:
    """The stream a deployment would see, from images none of the run's models trained on (module docstring)."""
    h = datamodule.hparams
    if h.source == "synthetic":
        size = rounds * DEFAULT_ROUND_SIZE if stream_size is None else stream_size
        k = round_size(size, rounds, None, "the synthetic stream")
        classes = datamodule.num_classes
        images, labels = make_synthetic_stream(
            -(-rounds * k // classes), h.synthetic_seed, datamodule.stored_image_size
        )
        description = f"synthetic stream split (seed {h.synthetic_seed}), {k} images a round"
        identity = {"kind": "synthetic", "synthetic_seed": h.synthetic_seed}
        return Stream("synthetic", description, images, labels, None, k, seed, identity)
    images, labels = datamodule.tensors("calib")
    if not len(labels):
        raise UserError(
            f"the run's {h.source} data has no calibration split to simulate a stream from: pass --record FILE "
            "(written by `edge --record`) or train the run with --data.calib_fraction above 0"
        )
    k = round_size(len(labels) if stream_size is None else stream_size, rounds, len(labels), "the calibration split")
    description = f"calibration split ({len(labels)} images), {k} images a round"
    identity = {"kind": "calib", "pool": len(labels)}
    return Stream("calib", description, images, labels, None, k, seed, identity)


def recorded_stream(path: str, record: Record, rounds: int, stream_size: int | None, seed: int) -> Stream:
    """A record's images and expert answers as the stream (cut into rounds like a simulated one)."""
    n = len(record.images)
    k = round_size(n if stream_size is None else stream_size, rounds, n, f"--record {path}")
    description = f"record {path} ({n} images, export version {record.model_version}), {k} images a round"
    identity = {"kind": "record", "sha256": file_sha256(path)}
    images, soft = torch.from_numpy(record.images), torch.from_numpy(record.soft_labels)
    return Stream("record", description, images, None, soft, k, seed, identity)

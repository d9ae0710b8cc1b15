"""Reader for a user's own images laid out as `ROOT/{train,test}/<class>/*.{png,jpg,jpeg}`.

Images are decoded once, converted to RGB and resized to a fixed square size, and held in memory as uint8
so the rest of the pipeline treats them exactly like CIFAR-100. An optional `ROOT/superclasses.json`
(class name -> superclass name) supplies the hierarchy the near-edge expert needs. The memory need is
checked before anything is decoded, so an oversized folder fails in a second rather than after minutes.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from askexpert.errors import UserError
from datamodules.splits import ImageSplits

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SUPERCLASS_FILE = "superclasses.json"
EXPECTED_LAYOUT = "ROOT/train/<class>/*.png|jpg|jpeg and ROOT/test/<class>/*.png|jpg|jpeg"

Metadata = tuple[list[str], list[str] | None, list[int] | None]
# split -> class name -> sorted image paths
Listing = dict[str, dict[str, list[str]]]


def load_imagefolder(root: str, image_size: int = 32, max_memory_gb: float = 4.0) -> ImageSplits:
    """Decode every image of both splits into uint8 (N, 3, image_size, image_size) tensors.

    Class index follows sorted class names (the same in both splits); superclass index follows sorted
    superclass names from `superclasses.json`, or there is no hierarchy when that file is absent.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if not max_memory_gb > 0:
        raise UserError(f"--data.max_memory_gb must be positive, got {max_memory_gb!r}")
    listing = _scan(root)
    _check_memory(listing, image_size, max_memory_gb)
    class_names, superclass_names, class_to_superclass = _metadata_from_listing(root, listing)
    tensors = {split: _decode_split(listing[split], class_names, image_size) for split in SPLITS}
    return ImageSplits(
        train_images=tensors["train"][0],
        train_labels=tensors["train"][1],
        test_images=tensors["test"][0],
        test_labels=tensors["test"][1],
        class_names=class_names,
        superclass_names=superclass_names,
        class_to_superclass=class_to_superclass,
    )


def imagefolder_metadata(root: str) -> Metadata:
    """Return (class_names, superclass_names, class_to_superclass) from directory listings and the json only.

    Runs the same layout checks as `load_imagefolder`, so a bad folder is reported before any model is built.
    """
    return _metadata_from_listing(root, _scan(root))


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def _scan(root: str) -> Listing:
    """List class folders and image files of both splits, and check the two splits name the same classes."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise UserError(f"image folder root {root!r} does not exist; expected {EXPECTED_LAYOUT}")
    listing: Listing = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserError(f"image folder {root!r} has no {split}/ folder; expected {EXPECTED_LAYOUT}")
        listing[split] = _scan_split(split_dir)
    _check_same_classes(root, listing)
    return listing


def _scan_split(split_dir: str) -> dict[str, list[str]]:
    classes = sorted(
        name for name in os.listdir(split_dir) if _is_visible(name) and os.path.isdir(os.path.join(split_dir, name))
    )
    if not classes:
        raise UserError(f"{split_dir} contains no class folders (and so no images); expected {EXPECTED_LAYOUT}")
    files = {}
    for name in classes:
        class_dir = os.path.join(split_dir, name)
        images = sorted(
            os.path.join(class_dir, f)
            for f in os.listdir(class_dir)
            if _is_visible(f) and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(class_dir, f))
        )
        if not images:
            raise UserError(f"class folder {class_dir} contains no .png/.jpg/.jpeg images")
        files[name] = images
    return files


def _check_same_classes(root: str, listing: Listing) -> None:
    """A class seen in only one split would have no train data or no test score: name it."""
    train, test = set(listing["train"]), set(listing["test"])
    for present, absent, names in (("train", "test", train - test), ("test", "train", test - train)):
        if names:
            shown = ", ".join(repr(n) for n in sorted(names))
            raise UserError(f"image folder {root!r}: class(es) {shown} in {present}/ but not in {absent}/")


def _check_memory(listing: Listing, image_size: int, max_memory_gb: float) -> None:
    count = sum(len(paths) for split in SPLITS for paths in listing[split].values())
    needed = count * 3 * image_size * image_size
    if needed > max_memory_gb * 1e9:
        raise UserError(
            f"holding {count} images at {image_size}x{image_size} needs {needed / 1e9:.2f} GB, more than "
            f"--data.max_memory_gb {max_memory_gb:g}; raise that setting or lower the image size"
        )


def _metadata_from_listing(root: str, listing: Listing) -> Metadata:
    class_names = sorted(listing["train"])
    superclass_names, class_to_superclass = _read_superclasses(os.path.expanduser(root), class_names)
    return class_names, superclass_names, class_to_superclass


def _read_superclasses(root: str, class_names: list[str]) -> tuple[list[str] | None, list[int] | None]:
    """Parse the optional class -> superclass json; it must cover exactly the classes on disk."""
    path = os.path.join(root, SUPERCLASS_FILE)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as handle:
            mapping = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise UserError(f"{path} must be a JSON object mapping each class name to a superclass name (a string)")
    unknown = sorted(set(mapping) - set(class_names))
    if unknown:
        raise UserError(f"{path} names class(es) not found in the image folders: {', '.join(map(repr, unknown))}")
    unmapped = [name for name in class_names if name not in mapping]
    if unmapped:
        raise UserError(f"{path} gives no superclass for class(es): {', '.join(map(repr, unmapped))}")
    superclass_names = sorted(set(mapping.values()))
    index = {name: i for i, name in enumerate(superclass_names)}
    return superclass_names, [index[mapping[name]] for name in class_names]


def to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float grayscale images to 8 bits (PIL's `convert("RGB")` clips them:
    a 16-bit photo turns white, a float one in [0, 1] black)."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return image
    import numpy as np

    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        pixels = pixels / 257.0
    elif image.mode == "F" and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    elif pixels.size and pixels.max() > 255:
        pixels = pixels / 257.0  # 32-bit integer mode holding 16-bit data (how PIL opens most 16-bit PNGs)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def decode_image(path: str, image_size: int) -> torch.Tensor:
    """Open one image as RGB at image_size x image_size (bilinear, antialiased when shrinking) -> (3, S, S)."""
    try:
        with Image.open(path) as image:
            image = to_8bit(image).convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image_size, image_size, 3).permute(2, 0, 1)


def _decode_split(
    files: dict[str, list[str]], class_names: list[str], image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a split in a small thread pool (PIL releases the GIL while decoding) into one uint8 tensor."""
    paths = [path for name in class_names for path in files[name]]
    labels = torch.tensor([i for i, name in enumerate(class_names) for _ in files[name]], dtype=torch.int64)
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)

    def fill(index: int) -> None:
        images[index] = decode_image(paths[index], image_size)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(paths))))  # list() re-raises the first worker error (a UserError)
    return images, labels

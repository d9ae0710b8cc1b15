"""The image-folder reader on tiny PNG/JPG folders written with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.datasets import make_folder, save_image
from PIL import Image

from askexpert.errors import UserError
from datamodules.imagefolder import imagefolder_metadata, load_imagefolder


def test_round_trip_sorted_classes_resized_rgb(tmp_path: Path) -> None:
    splits = load_imagefolder(str(make_folder(tmp_path)), image_size=8)
    assert splits.class_names == ["ant", "cat", "zebra"]
    assert splits.train_images.shape == (5, 3, 8, 8) and splits.train_images.dtype == torch.uint8
    assert splits.test_images.shape == (3, 3, 8, 8)
    assert splits.train_labels.tolist() == [0, 0, 1, 2, 2] and splits.test_labels.tolist() == [0, 1, 2]
    assert splits.train_images[0].unique().tolist() == [90]  # grayscale -> equal RGB channels
    assert splits.train_images[1, :, 0, 0].tolist() == [1, 2, 250]  # RGBA -> alpha dropped
    assert splits.train_images[3, :, 4, 4].tolist() == [200, 10, 10]  # channel order stays R, G, B
    assert splits.test_images[2, :, 0, 0].tolist() == [11, 12, 13]
    assert splits.superclass_names is None and splits.class_to_superclass is None
    assert imagefolder_metadata(str(tmp_path)) == (["ant", "cat", "zebra"], None, None)


def test_superclasses_json(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "superclasses.json").write_text(json.dumps({"zebra": "mammal", "cat": "mammal", "ant": "insect"}))
    splits = load_imagefolder(str(tmp_path), image_size=4)
    assert splits.superclass_names == ["insect", "mammal"]
    assert splits.class_to_superclass == [0, 1, 1]
    assert imagefolder_metadata(str(tmp_path)) == (["ant", "cat", "zebra"], ["insect", "mammal"], [0, 1, 1])


def test_memory_limit_checked_before_decoding(tmp_path: Path) -> None:
    make_folder(tmp_path)
    save_image(tmp_path / "train" / "ant" / "broken.png", (0, 0, 0))
    (tmp_path / "train" / "ant" / "broken.png").write_bytes(b"garbage")  # would fail if decoded first
    with pytest.raises(UserError) as info:
        load_imagefolder(str(tmp_path), image_size=1000, max_memory_gb=0.001)
    message = str(info.value)
    assert "--data.max_memory_gb" in message and "9 images" in message and "0.03 GB" in message


def _raises(root: Path, *fragments: str, image_size: int = 4) -> None:
    with pytest.raises(UserError) as info:
        load_imagefolder(str(root), image_size=image_size)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_root(tmp_path: Path) -> None:
    _raises(tmp_path / "absent", str(tmp_path / "absent"), "does not exist")
    with pytest.raises(UserError, match="does not exist"):
        imagefolder_metadata(str(tmp_path / "absent"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split_folder(tmp_path: Path, split: str) -> None:
    make_folder(tmp_path)
    for path in sorted((tmp_path / split).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / split).rmdir()
    _raises(tmp_path, f"no {split}/ folder")


def test_class_only_in_train(tmp_path: Path) -> None:
    make_folder(tmp_path)
    save_image(tmp_path / "train" / "dog" / "a.png", (1, 1, 1))
    _raises(tmp_path, "'dog'", "in train/ but not in test/")


def test_class_only_in_test(tmp_path: Path) -> None:
    make_folder(tmp_path)
    save_image(tmp_path / "test" / "eel" / "a.png", (1, 1, 1))
    _raises(tmp_path, "'eel'", "in test/ but not in train/")
    with pytest.raises(UserError, match="'eel'"):
        imagefolder_metadata(str(tmp_path))


def test_class_folder_without_images(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "test" / "cat" / "t.png").unlink()
    (tmp_path / "test" / "cat" / "readme.md").write_text("no images here")
    _raises(tmp_path, "cat", "contains no .png/.jpg/.jpeg images")


def test_split_without_images(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train").mkdir()
    (tmp_path / "empty" / "test").mkdir()
    _raises(tmp_path / "empty", "train", "no class folders")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG not really")
    _raises(tmp_path, "bad.png", "cannot read image")


def test_truncated_jpeg_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path)
    path = tmp_path / "test" / "zebra" / "cut.jpg"
    save_image(path, (1, 2, 3), size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    _raises(tmp_path, "cut.jpg", "cannot read image")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("{not json", ("superclasses.json", "cannot read")),
        (json.dumps(["ant", "cat"]), ("superclasses.json", "JSON object")),
        (json.dumps({"ant": 3, "cat": "x", "zebra": "x"}), ("superclasses.json", "JSON object")),
        (json.dumps({"ant": "a", "cat": "b"}), ("superclasses.json", "no superclass", "'zebra'")),
        (json.dumps({"ant": "a", "cat": "b", "zebra": "b", "yak": "b"}), ("superclasses.json", "not found", "'yak'")),
    ],
)
def test_malformed_superclasses_json(tmp_path: Path, content: str, fragments: tuple[str, ...]) -> None:
    make_folder(tmp_path)
    (tmp_path / "superclasses.json").write_text(content)
    _raises(tmp_path, *fragments)
    with pytest.raises(UserError, match="superclasses.json"):
        imagefolder_metadata(str(tmp_path))


def test_bad_settings(tmp_path: Path) -> None:
    make_folder(tmp_path)
    _raises(tmp_path, "image_size", image_size=0)
    with pytest.raises(UserError, match="max_memory_gb"):
        load_imagefolder(str(tmp_path), max_memory_gb=0)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np

    from datamodules.imagefolder import decode_image

    Image.fromarray(np.full((6, 6), 127 * 257, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    assert decode_image(str(tmp_path / "deep.png"), 4).unique().tolist() == [127]
    assert decode_image(str(tmp_path / "float.tif"), 4).unique().tolist() == [128]

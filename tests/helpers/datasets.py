"""Datasets written the way users have them: an image folder, and the official CIFAR-100 python layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, color: tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = color[0] if mode == "L" else color
    Image.new(mode, size, value).save(path)


def make_folder(root: Path) -> Path:
    """Classes deliberately created out of order; mixed formats, modes and extension case."""
    save_image(root / "train" / "zebra" / "a.png", (200, 10, 10))
    save_image(root / "train" / "zebra" / "b.JPG", (10, 200, 10))
    save_image(root / "train" / "ant" / "a.png", (90,), mode="L")
    save_image(root / "train" / "ant" / "b.png", (1, 2, 250, 128), mode="RGBA")
    save_image(root / "train" / "cat" / "x.jpeg", (100, 100, 100))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    save_image(root / "test" / "ant" / "t.png", (5, 6, 7))
    save_image(root / "test" / "cat" / "t.png", (8, 9, 10))
    save_image(root / "test" / "zebra" / "t.png", (11, 12, 13))
    return root


FINE = ["apple", "bear", "cloud", "dolphin"]


COARSE = ["animals", "things"]


FINE_TO_COARSE = [1, 0, 1, 0]


def cifar_split(count_per_class: int, seed: int, fine_to_coarse: list[int]) -> dict:
    """One split dict with the same keys and types as the official files (data rows are CHW-flattened)."""
    rng = np.random.default_rng(seed)
    fine = [c for c in range(len(fine_to_coarse)) for _ in range(count_per_class)]
    return {
        "filenames": [f"img_{i}.png" for i in range(len(fine))],
        "batch_label": "training batch 1 of 1",
        "fine_labels": fine,
        "coarse_labels": [fine_to_coarse[c] for c in fine],
        "data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
    }


def write_pickle(folder: Path, name: str, content: dict) -> None:
    with open(folder / name, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar(
    root: Path, fine: list[str] = FINE, coarse: list[str] = COARSE, fine_to_coarse: list[int] = FINE_TO_COARSE
) -> tuple[dict, dict]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = cifar_split(3, 0, fine_to_coarse), cifar_split(2, 1, fine_to_coarse)
    write_pickle(folder, "train", train)
    write_pickle(folder, "test", test)
    write_pickle(folder, "meta", {"fine_label_names": list(fine), "coarse_label_names": list(coarse)})
    return train, test

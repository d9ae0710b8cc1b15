"""The CIFAR-100 reader on a tiny file set written in the official pickle layout (no real data needed)."""

from __future__ import annotations

import os
import pickle
import struct
import urllib.error
from pathlib import Path

import pytest
import torch
from helpers.datasets import COARSE, FINE, FINE_TO_COARSE, cifar_split, write_cifar, write_pickle

from askexpert.errors import UserError
from datamodules import cifar100
from datamodules.cifar100 import cifar100_metadata, load_cifar100
from datamodules.labels import CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE


def test_round_trip_keeps_chw_images_labels_and_names(tmp_path: Path) -> None:
    train, test = write_cifar(tmp_path)
    splits = load_cifar100(str(tmp_path), verify_checksums=False)
    assert splits.train_images.shape == (12, 3, 32, 32) and splits.test_images.shape == (8, 3, 32, 32)
    # Row layout is R plane, G plane, B plane (CHW), so pixel (c, y, x) sits at c*1024 + y*32 + x.
    assert splits.train_images[5, 2, 7, 9].item() == train["data"][5, 2 * 1024 + 7 * 32 + 9]
    assert torch.equal(splits.train_images.reshape(12, -1), torch.from_numpy(train["data"]))
    assert torch.equal(splits.test_images.reshape(8, -1), torch.from_numpy(test["data"]))
    assert splits.train_labels.tolist() == train["fine_labels"] and splits.train_labels.dtype == torch.int64
    assert splits.test_labels.tolist() == test["fine_labels"]
    assert splits.class_names == FINE and splits.superclass_names == COARSE
    assert splits.class_to_superclass == FINE_TO_COARSE
    assert not splits.stand_in


def test_root_may_be_the_cifar_folder_itself(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    splits = load_cifar100(str(tmp_path / "cifar-100-python"), verify_checksums=False)
    assert splits.class_names == FINE
    assert cifar100_metadata(str(tmp_path / "cifar-100-python")) == (FINE, COARSE, FINE_TO_COARSE)


def test_metadata_derives_map_from_test_labels_for_custom_names(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    assert cifar100_metadata(str(tmp_path)) == (FINE, COARSE, FINE_TO_COARSE)


def test_metadata_uses_official_map_without_reading_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    official = {"fine_label_names": list(CIFAR100_FINE_NAMES), "coarse_label_names": list(CIFAR100_COARSE_NAMES)}
    write_pickle(folder, "meta", official)
    # No train/test files at all: official names must be enough.
    names, supers, mapping = cifar100_metadata(str(tmp_path))
    assert names == list(CIFAR100_FINE_NAMES) and supers == list(CIFAR100_COARSE_NAMES)
    assert mapping == list(CIFAR100_FINE_TO_COARSE)


def test_fine_class_in_two_superclasses_is_rejected(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    test = cifar_split(2, 1, FINE_TO_COARSE)
    test["coarse_labels"][0] = 1 - test["coarse_labels"][0]  # an 'apple' now also in 'animals'
    write_pickle(folder, "test", test)
    with pytest.raises(UserError, match="'apple' maps to two superclasses"):
        load_cifar100(str(tmp_path), verify_checksums=False)


def test_checksum_failure_names_file_and_fix(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    with pytest.raises(UserError) as info:
        load_cifar100(str(tmp_path), verify_checksums=True)
    message = str(info.value)
    assert os.path.join("cifar-100-python", "train") in message and "checksum mismatch" in message
    assert "re-download" in message and "--data.verify_checksums false" in message


def test_checksum_matching_official_md5_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification accepts files whose md5 matches (checked by swapping in this copy's md5s)."""
    import hashlib

    write_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    digests = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}
    monkeypatch.setattr(cifar100, "MD5", digests)
    assert load_cifar100(str(tmp_path)).class_names == FINE
    with open(folder / "meta", "ab") as handle:  # tamper: one extra byte
        handle.write(b"\0")
    with pytest.raises(UserError, match=r"checksum mismatch for .*meta"):
        load_cifar100(str(tmp_path))


def test_missing_root_names_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        load_cifar100(str(missing))
    message = str(info.value)
    assert str(missing) in message and "cifar-100-python/{train,test,meta}" in message
    assert "--data.download true" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(UserError, match=r"missing: .*cifar-100-python.test.*--data.download true"):
        load_cifar100(str(tmp_path), verify_checksums=False)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(UserError, match=r"missing: .*meta"):
        cifar100_metadata(str(tmp_path))


def test_truncated_pickle_names_file(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match=r"cannot read CIFAR-100 file .*train"):
        load_cifar100(str(tmp_path), verify_checksums=False)


def test_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    meta = {"fine_label_names": FINE, "coarse_label_names": COARSE, "x": Path("a")}  # a Path needs a foreign global
    write_pickle(tmp_path / "cifar-100-python", "meta", meta)
    with pytest.raises(UserError, match=r"cannot read CIFAR-100 file .*meta.*refusing to load"):
        load_cifar100(str(tmp_path), verify_checksums=False)


def test_download_failure_offline_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as info:
        load_cifar100(str(tmp_path / "data"), download=True)
    message = str(info.value)
    assert "downloading CIFAR-100" in message and "offline" in message and "no network" in message
    assert str(tmp_path / "data") in message and "cifar-100-python.tar.gz" in message


def test_download_skipped_when_files_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    write_cifar(tmp_path)
    assert load_cifar100(str(tmp_path), download=True, verify_checksums=False).class_names == FINE


class _Python2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes arrays the way the official (Python 2, old numpy) files do: raw BINSTRING, numpy.core globals."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        self.write(b"T" + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj: object, name: str | None = None) -> None:
        name = name or obj.__name__  # type: ignore[attr-defined]
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[type] = save_global


def test_reads_python2_style_pickles(tmp_path: Path) -> None:
    train, test = write_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    for name, content in (("train", train), ("test", test)):
        with open(folder / name, "wb") as handle:
            _Python2StylePickler(handle, protocol=2).dump(content)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "train").read_bytes()
    splits = load_cifar100(str(tmp_path), verify_checksums=False)
    assert torch.equal(splits.train_images.reshape(12, -1), torch.from_numpy(train["data"]))
    assert splits.class_to_superclass == FINE_TO_COARSE

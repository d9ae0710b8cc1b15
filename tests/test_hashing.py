"""askexpert/files/hashing.py: a file's SHA-256, by content only (what keys the logits cache and an export)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import REPO

from askexpert.files.hashing import file_sha256

BLOCK = 1 << 20  # what file_sha256 reads at a time


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, 2 * BLOCK + 7])
def test_the_digest_is_the_sha256_of_the_content(tmp_path, size) -> None:
    """Sizes around the read block: no byte is lost or read twice where blocks meet."""
    data = os.urandom(size)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    digest = file_sha256(str(path))
    assert digest == hashlib.sha256(data).hexdigest()
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_content_not_name_or_time_decides(tmp_path) -> None:
    data = os.urandom(1000)
    (tmp_path / "a.ckpt").write_bytes(data)
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "b.ckpt").write_bytes(data)
    os.utime(tmp_path / "moved" / "b.ckpt", (0, 0))
    assert file_sha256(str(tmp_path / "a.ckpt")) == file_sha256(str(tmp_path / "moved" / "b.ckpt"))
    (tmp_path / "moved" / "b.ckpt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit
    assert file_sha256(str(tmp_path / "a.ckpt")) != file_sha256(str(tmp_path / "moved" / "b.ckpt"))


def test_a_missing_file_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        file_sha256(str(tmp_path / "absent"))


def test_hashing_does_not_load_torch(tmp_path) -> None:
    """The expert server's workers import it: hashing a model file must not pay for torch."""
    (tmp_path / "f").write_bytes(b"abc")
    script = "import sys; from askexpert.files.hashing import file_sha256; file_sha256(sys.argv[1]); "
    script += "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f")], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr

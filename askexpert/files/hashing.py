"""Content hashes of files (torch-free: the expert server's workers import it)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Content hashes of files, read in blocks: what keys the logits cache to a checkpoint's content rather than its path
(collab/logits.py) and what the export manifest records. Standard library only."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

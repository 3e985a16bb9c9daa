"""Content identity of input files: resumed work and patch stores must never mix two different slides
or models that happen to share a path."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    """SHA-256 of a file (of its first ``limit`` bytes if given), streamed in 1 MiB pieces."""
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()

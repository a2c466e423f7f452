"""SHA-256 of dataset files' contents, computed once per process for files that did not change.

The resume check and the token cache both key on what a dataset's files hold; hashing a large
dataset twice at every start would read it twice, so the digest is kept per (names, sizes, mtimes).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

CHUNK_BYTES = 1 << 20


def content_hash(files: Sequence[str]) -> str:
    """SHA-256 over the files' bytes in order (each one's name length-prefixed, so shards do not blur)."""
    stats = tuple((os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    return _hash(tuple(str(f) for f in files), stats)


@functools.lru_cache(maxsize=64)
def _hash(files: tuple[str, ...], stats: tuple) -> str:  # stats: part of the key, so a changed file is read again
    h = hashlib.sha256()
    for name in files:
        h.update(f"{len(Path(name).name)}:{Path(name).name}".encode())
        with open(name, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                h.update(chunk)
    return h.hexdigest()


def dataset_files(path: Path) -> list[str]:
    """A file, or every file under a directory (Parquet shards, a ``save_to_disk`` directory), sorted."""
    return [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*") if p.is_file())

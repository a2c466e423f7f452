"""JSON Lines files, whole: the one reader and writer of the files stages write and read back
(generations, scored and dropped records, curated sets, resume records).

A user's dataset goes through ``rayalign.data.readers`` instead, which names each bad record by
file and line; these functions trust what they read (rayalign wrote it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]], append: bool = False) -> int:
    """One JSON object per line; returns how many rows were written."""
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file in order; blank lines are skipped."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))

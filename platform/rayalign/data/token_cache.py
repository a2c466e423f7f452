"""Tokenizations kept on disk by content hash, so a restarted run does not tokenize its data again.

An entry's key hashes everything its tokens depend on:
- the dataset's content: a hash of its files' bytes, read in chunks (never whole), in order;
- which of its rows became records (their ``file:row`` places), so a format plugin or policy that
  keeps other rows gets its own entry;
- the tokenizer: ``name_or_path``, vocabulary size, class and a hash of its chat template;
- ``max_length`` (an over-long record is stored as its length only) and the tokenization scheme.

Entries are Arrow IPC files under ``$RAYALIGN_CACHE_DIR`` (default ``~/.cache/rayalign/tokens``;
``RAYALIGN_CACHE`` moves ``~/.cache/rayalign``), written to a temporary name and renamed, so a
crash never leaves half an entry. Deleting the directory clears the cache; nothing else needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayalign.data.file_hash import content_hash
from rayalign.embedded import cache_root

CACHE_ENV = "RAYALIGN_CACHE_DIR"


def cache_dir() -> Path:
    """Where entries live: ``$RAYALIGN_CACHE_DIR``, else ``tokens`` under rayalign's cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return cache_root() / "tokens"


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What makes two tokenizers tokenize alike, as far as it can be told without comparing vocabularies."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # several named templates
        template = json.dumps(template, sort_keys=True)
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
            "class": type(tokenizer).__name__, "chat_template": hashlib.sha256(template.encode()).hexdigest()}


def places_hash(places: Sequence[str]) -> str:
    h = hashlib.sha256()
    for place in places:
        h.update(place.encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(files: Sequence[str], places: Sequence[str], tokenizer, max_length: int, scheme: str) -> str:
    parts = {"content": content_hash(files), "places": places_hash(places), "tokenizer": tokenizer_identity(tokenizer),
             "max_length": max_length, "scheme": scheme}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# An entry: per record, its length in tokens, and its ids and labels when it fits max_length (else None).
Entry = list[tuple[int, list[int] | None, list[int] | None]]


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.arrow"


def load(key: str, expected: int) -> Entry | None:
    """The entry under ``key`` if there is a whole one of ``expected`` records; else None (a miss)."""
    import pyarrow as pa

    path = entry_path(key)
    if not path.exists():
        return None
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError):  # unreadable: tokenize again and overwrite it
        return None
    if table.num_rows != expected:
        return None
    return list(zip(table.column("length").to_pylist(), table.column("input_ids").to_pylist(),
                    table.column("labels").to_pylist()))


def store(key: str, entry: Entry) -> Path:
    """Write atomically; a cache that cannot be written (read-only home) only costs the next run time."""
    import pyarrow as pa

    path = entry_path(key)
    ids = pa.list_(pa.int32())
    table = pa.table({"length": pa.array([e[0] for e in entry], pa.int32()),
                      "input_ids": pa.array([e[1] for e in entry], ids),
                      "labels": pa.array([e[2] for e in entry], ids)})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return path

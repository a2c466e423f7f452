"""Tokenizations kept on disk by content hash, so a restarted run does not tokenize its data again.

An entry's key hashes everything its tokens depend on:
- the dataset's content: a hash of its files' bytes, read in chunks (never whole), in order;
- which of its rows became records (their ``file:row`` places), so a format plugin or policy that
  keeps other rows gets its own entry;
- the tokenizer: ``name_or_path``, vocabulary size, class and a hash of its chat template;
- ``max_length`` (an over-long sequence is stored as its length only) and the tokenization scheme.

An entry holds one row per sequence (a chat record has one, a preference pair two, chosen then
rejected): its length, and its ids and labels when it fits ``max_length``. Loaded back they are
int32 arrays, views of the file's flat columns (``Tokenized``), never Python lists.

Entries are Arrow IPC files under ``$RAYALIGN_CACHE_DIR`` (default ``~/.cache/rayalign/tokens``;
``RAYALIGN_CACHE`` moves ``~/.cache/rayalign``), written to a temporary name and renamed, so a
crash never leaves half an entry. Deleting the directory clears the cache; nothing else needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.data.chat import Tokenized
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


@dataclass(slots=True)
class TooLong:
    """A sequence over ``max_length``: the cache keeps its length only, all the length check needs."""

    length: int

    def __len__(self) -> int:
        return self.length


# An entry: per sequence, its tokens when it fits max_length, else its length only.
Entry = list[Tokenized | TooLong]

BATCH_ROWS = 8192  # rows per Arrow record batch, so writing copies a bounded share of the tokens at a time
BATCH_TOKENS = 1 << 28  # and fewer tokens than that in a batch (its int32 offsets must not overflow)


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.arrow"


def load(key: str, expected: int) -> Entry | None:
    """The entry under ``key`` if there is a whole one of ``expected`` rows; else None (a miss)."""
    import pyarrow as pa

    path = entry_path(key)
    if not path.exists():
        return None
    try:  # read into this process's memory (not mapped), so the file may go while the run holds its tokens
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_file(source)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowException, OSError):  # unreadable: tokenize again and overwrite it
        return None
    if sum(batch.num_rows for batch in batches) != expected:
        return None
    out: Entry = []
    for batch in batches:
        out += _rows(batch)
    return out


def _rows(batch) -> Entry:
    """A record batch's rows as views of its flat ``values`` at its ``offsets`` (no per-token objects)."""
    ids, labels = batch.column("input_ids"), batch.column("labels")
    id_values, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy().tolist()
    label_values, label_offsets = labels.values.to_numpy(), labels.offsets.to_numpy().tolist()
    held = ids.is_valid().to_numpy(zero_copy_only=False).tolist()
    lengths = batch.column("length").to_numpy().tolist()
    return [Tokenized(id_values[id_offsets[i] : id_offsets[i + 1]],
                      label_values[label_offsets[i] : label_offsets[i + 1]])
            if held[i] else TooLong(lengths[i]) for i in range(batch.num_rows)]


def store(key: str, entry: Entry) -> Path:
    """Write atomically; a cache that cannot be written (read-only home) only costs the next run time."""
    import pyarrow as pa

    path = entry_path(key)
    schema = pa.schema([("length", pa.int32()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for rows in _batched(entry):
                writer.write_batch(_batch(rows, schema))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return path


def _batched(entry: Entry):
    start, tokens = 0, 0
    for i, row in enumerate(entry):
        if i > start and (i - start == BATCH_ROWS or tokens + len(row) > BATCH_TOKENS):
            yield entry[start:i]
            start, tokens = i, 0
        tokens += len(row)
    if start < len(entry):
        yield entry[start:]


def _batch(rows: Entry, schema):
    import pyarrow as pa

    held = np.array([isinstance(row, Tokenized) for row in rows], dtype=bool)
    lengths = np.array([len(row) for row in rows], dtype=np.int32)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(np.where(held, lengths, 0), out=offsets[1:])
    offsets, absent = pa.array(offsets), pa.array(~held)

    def lists(field: str):
        values = np.concatenate([np.zeros(0, np.int32), *(getattr(r, field) for r in rows if isinstance(r, Tokenized))])
        return pa.ListArray.from_arrays(offsets, pa.array(values), mask=absent)

    return pa.record_batch([pa.array(lengths), lists("input_ids"), lists("labels")], schema=schema)

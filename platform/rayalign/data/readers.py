"""Rows of a dataset as people store it: JSONL, Parquet, a ``save_to_disk`` directory, a hub id.

A reader only reads: it yields every row as ``(file, number, value)``, where ``value`` is the raw
record as a dict, or the ``RecordProblem`` that kept the row from being one (a JSONL line that is
not JSON). Checking a record against the dataset formats is one loop for every reader
(``formats.check_rows``), so a Parquet row and a JSONL line are judged alike.

Rows are numbered from 1 within their file: the line of a JSONL file (blank lines count, as an
editor shows them), the row of a Parquet shard or Arrow file. ``file:number`` names a bad one.

Large inputs stream: JSONL line by line, Parquet by record batches, Arrow memory-mapped, so the
raw text is never held whole; the caller keeps only what it converted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rayalign.data.validation import Origin, RecordProblem
from rayalign.errors import DataError

BATCH_ROWS = 4096  # rows per record batch from a columnar file: bounded memory, few Python calls

Row = tuple[str, int, "dict[str, Any] | RecordProblem"]  # file, number within it (from 1), record or problem

# owner/name as hub ids are spelled; a name ending in a data file's suffix is a path, never a hub id.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")


@dataclass(frozen=True)
class OpenedDataset:
    """A dataset path resolved to what will be read: its rows, how they are counted, its files."""

    origin: Origin
    unit: str  # "line" (JSONL) or "row" (columnar): how messages count a row within its file
    rows: Callable[[], Iterator[Row]]


def open_dataset(path: str | Path) -> OpenedDataset:
    """What ``path`` holds; ``DataError`` naming it when it is nothing we can read."""
    name, p = str(path), Path(path)
    if p.is_file():
        if p.suffix == ".parquet":
            return _parquet([p])
        return OpenedDataset(Origin("jsonl", (name,)), "line", lambda: jsonl_rows(name))
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _arrow_dataset(_load_from_disk(p), name, "arrow")
        shards = sorted(p.glob("*.parquet"))
        if shards:
            return _parquet(shards)
        raise DataError(name, "a directory with no Parquet shards (*.parquet) and no datasets.save_to_disk "
                        "dataset (state.json or dataset_dict.json) in it")
    if looks_like_hub_id(name):
        return _arrow_dataset(_load_from_hub(name), name, "hub")
    raise DataError(name, "file does not exist")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name``, as the hub spells datasets; ``data/train.jsonl`` is a (missing) file."""
    return bool(HUB_ID.fullmatch(name)) and not name.lower().endswith(FILE_SUFFIXES)


# -- JSONL ----------------------------------------------------------------------------------------

def decode_line(data: bytes, lineno: int) -> str:
    """A line's text; ``RecordProblem`` naming the first byte that is not UTF-8 and its column."""
    if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a byte-order mark, as some editors save UTF-8: not part of the record
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(data[: exc.start].decode("utf-8")) + 1  # in characters, as JSON errors count them
        raise RecordProblem("invalid_utf8",
                            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})") from None


def parse_line(data: bytes, lineno: int) -> dict[str, Any]:
    """One JSONL line to its object, or ``RecordProblem`` saying why it is none."""
    line = decode_line(data, lineno)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordProblem("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecordProblem("not_an_object", "expected a JSON object")
    return record


def jsonl_rows(path: str) -> Iterator[Row]:
    """(path, line number, record or the ``RecordProblem`` that makes it none) for each non-blank
    line: the one parser of a user's JSONL, which every reader of one goes through."""
    with open(path, "rb") as fh:  # bytes: one undecodable line is a bad record, not a crash of the file
        for lineno, data in enumerate(fh, start=1):
            if not data.strip():
                continue  # blank lines are not records
            try:
                yield path, lineno, parse_line(data, lineno)
            except RecordProblem as exc:
                yield path, lineno, exc


# -- columnar: Parquet, Arrow ---------------------------------------------------------------------

def without_nulls(value: Any) -> Any:
    """Columnar rows share one schema, so a field one row lacks is a null there: drop it, so it reads
    as the absent field it is in JSON (``missing_field``, an optional field left out)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _batch_rows(file: str, batches) -> Iterator[Row]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield file, row, without_nulls(record)


def _parquet(files: list[Path]) -> OpenedDataset:
    def rows() -> Iterator[Row]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for f in files:
            name = str(f)
            try:
                reader = pq.ParquetFile(name)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(name, f"not a readable Parquet file ({_first_line(exc)})") from None
            try:
                yield from _batch_rows(name, reader.iter_batches(batch_size=BATCH_ROWS))
            except (pa.ArrowException, OSError) as exc:  # a page damaged midway through the file
                raise DataError(name, f"unreadable Parquet data ({_first_line(exc)})") from None

    return OpenedDataset(Origin("parquet", tuple(str(f) for f in files)), "row", rows)


def _arrow_dataset(ds, label: str, fmt: str) -> OpenedDataset:
    """A ``datasets.Dataset``: its Arrow files one by one (memory-mapped), rows named by file."""
    files = tuple(f["filename"] for f in ds.cache_files)

    def rows() -> Iterator[Row]:
        if not files:  # held in memory (nothing on disk to name): rows are named by the dataset
            yield from _batch_rows(label, ds.with_format("arrow").iter(batch_size=BATCH_ROWS))
            return
        from datasets import Dataset

        for f in files:
            shard = Dataset.from_file(f)
            yield from _batch_rows(f, shard.with_format("arrow").iter(batch_size=BATCH_ROWS))

    return OpenedDataset(Origin(fmt, files), "row", rows)


def _train_split(dd, name: str):
    """The ``train`` split of a ``DatasetDict``; one line naming the splits when it has none."""
    if "train" in dd:
        return dd["train"]
    splits = ", ".join(dd)
    raise DataError(name, f"a DatasetDict with splits {splits} and no 'train' split: name one split's "
                    f"directory instead (e.g. {name.rstrip('/')}/{next(iter(dd), 'split')})")


def _load_from_disk(path: Path):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # a damaged or foreign directory: datasets' own error, on one line
        raise DataError(str(path), f"not a readable datasets.save_to_disk directory ({_first_line(exc)})") from None
    return _train_split(ds, str(path)) if isinstance(ds, DatasetDict) else ds


def _load_from_hub(name: str):
    """``datasets.load_dataset(name)``'s train split, for machines that reach a hub."""
    from datasets import DatasetDict, load_dataset

    try:
        ds = load_dataset(name)
    except Exception as exc:  # offline, unknown name, gated: the library says which
        raise DataError(name, f"no such file or directory, and loading it as a hub dataset failed "
                        f"({_first_line(exc)})") from None
    return _train_split(ds, name) if isinstance(ds, DatasetDict) else ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]

"""Chat records to training tokens: from the token cache when this data was tokenized before, else
tokenized (in worker processes when there are many records) and stored for the next run.

Then the length check of every stage (``validation.within_max_length``): a record longer than
``max_length`` is a ``too_long`` bad record whether its tokens came from the cache or not, so a
restarted run skips, counts and names the same records as the first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from rayalign.data import token_cache
from rayalign.data.chat import Tokenized, tokenize_conversation
from rayalign.data.token_cache import TooLong
from rayalign.data.validation import Records, within_max_length
from rayalign.errors import DataError

SCHEME = "chat-v1"  # what tokenize_conversation returns; change it when that changes, to retire old entries
PARALLEL_MIN_RECORDS = 4096  # below this, starting worker processes costs more than it saves
CHUNK_RECORDS = 512
MAX_WORKERS = 8


def tokenize_chats(records: Records, tokenizer, max_length: int, *, workers: int | None = None,
                   cache: bool = True) -> tuple[Records, list[Tokenized]]:
    """The records that fit ``max_length`` and their tokenizations, in order (see the module docstring).

    Embedded (synthetic) data has no files to hash and is not cached: it is small.
    """
    key = None
    entry = None
    if cache and records.origin.files:
        key = token_cache.cache_key(records.origin.files, [r.where for r in records], tokenizer, max_length, SCHEME)
        entry = token_cache.load(key, len(records))
    if entry is None:
        entry = tokenize_all([(r.where, r["messages"]) for r in records], tokenizer, max_length, workers)
        if key is not None:
            token_cache.store(key, entry)
    by_record = {id(r): row for r, row in zip(records, entry)}
    return within_max_length(records, lambda r: by_record[id(r)], max_length)


def tokenize_all(items: Sequence[tuple[str, list[dict]]], tokenizer, max_length: int,
                 workers: int | None = None) -> token_cache.Entry:
    """``Tokenized`` per ``(where, messages)``, or ``TooLong`` above ``max_length``.

    In ``workers`` processes (default: the CPUs this process may use, at most ``MAX_WORKERS``) when
    there are ``PARALLEL_MIN_RECORDS`` or more, else here.
    """
    workers = workers if workers is not None else min(MAX_WORKERS, len(os.sched_getaffinity(0)))
    if workers <= 1 or len(items) < PARALLEL_MIN_RECORDS:
        return _tokenize_items(tokenizer, items, max_length)
    chunks = [items[i : i + CHUNK_RECORDS] for i in range(0, len(items), CHUNK_RECORDS)]
    # forkserver, not fork: the driver has Ray's and the tokenizer's threads, which a fork copies mid-lock.
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=_start_worker,
                             initargs=(tokenizer,)) as pool:
        out: token_cache.Entry = []
        for part in pool.map(_worker_chunk, chunks, [max_length] * len(chunks)):
            if isinstance(part, _Failure):
                raise DataError(part.where, part.message)
            out += part
    return out


_worker_tokenizer: Any = None


def _start_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


class _Failure:
    """A ``DataError`` from a worker (its two-argument constructor does not survive pickling)."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message


def _tokenize_items(tokenizer, items: Sequence[tuple[str, list[dict]]], max_length: int) -> token_cache.Entry:
    out: token_cache.Entry = []
    for where, messages in items:
        t = tokenize_conversation(tokenizer, messages, None, where=where)
        out.append(t if len(t) <= max_length else TooLong(len(t)))
    return out


def _worker_chunk(items: Sequence[tuple[str, list[dict]]], max_length: int) -> token_cache.Entry | _Failure:
    try:
        return _tokenize_items(_worker_tokenizer, items, max_length)
    except DataError as exc:
        return _Failure(exc.where, str(exc).removeprefix(f"data error: {exc.where}: "))


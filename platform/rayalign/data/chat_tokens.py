"""Chat records and preference pairs to training tokens: from the token cache when this data was
tokenized before, else tokenized (in worker processes when there are many records) and stored for
the next run.

Then the length check of every stage (``validation.within_max_length``): a record (a pair: either
side) longer than ``max_length`` is a ``too_long`` bad record whether its tokens came from the cache
or not, so a restarted run skips, counts and names the same records as the first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from rayalign.data import token_cache
from rayalign.data.chat import Tokenized, tokenize_completion, tokenize_conversation
from rayalign.data.token_cache import TooLong
from rayalign.data.validation import Record, Records, within_max_length
from rayalign.errors import DataError

# What tokenize_conversation (chat) and tokenize_completion on both sides (pair) return; change a
# scheme's name when that changes, to retire its old entries.
SCHEME = "chat-v1"
PAIR_SCHEME = "pair-v1"
PARALLEL_MIN_RECORDS = 4096  # below this, starting worker processes costs more than it saves
CHUNK_RECORDS = 512
MAX_WORKERS = 8


def tokenize_chats(records: Records, tokenizer, max_length: int, *, workers: int | None = None,
                   cache: bool = True) -> tuple[Records, list[Tokenized]]:
    """The chat records that fit ``max_length`` and their tokenizations, in order (see the module docstring).

    Embedded (synthetic) data has no files to hash and is not cached: it is small.
    """
    rows = _rows(records, lambda r: r["messages"], tokenizer, max_length, SCHEME, workers, cache)
    by_record = {id(r): row for r, row in zip(records, rows)}
    return within_max_length(records, lambda r: by_record[id(r)], max_length)


def tokenize_pairs(records: Records, tokenizer, max_length: int, *, workers: int | None = None,
                   cache: bool = True) -> tuple[Records, list[tuple[Tokenized, Tokenized]]]:
    """The preference records (prompt, chosen, rejected) whose prompt + chosen and prompt + rejected
    both fit ``max_length``, and their ``(chosen, rejected)`` tokenizations (``tokenize_completion``), in order.

    Cached as ``tokenize_chats`` is, in an entry of its own (scheme ``pair-v1``, two rows a pair).
    """
    rows = _rows(records, lambda r: (r["prompt"], r["chosen"], r["rejected"]), tokenizer, max_length, PAIR_SCHEME,
                 workers, cache)
    by_record = {id(r): (rows[2 * i], rows[2 * i + 1]) for i, r in enumerate(records)}
    return within_max_length(records, lambda r: by_record[id(r)], max_length)


def _rows(records: Records, payload: Callable[[Record], Any], tokenizer, max_length: int, scheme: str,
          workers: int | None, cache: bool) -> token_cache.Entry:
    """The cache entry of ``records`` under ``scheme``: loaded, or tokenized and stored."""
    key = None
    if cache and records.origin.files:
        key = token_cache.cache_key(records.origin.files, [r.where for r in records], tokenizer, max_length, scheme)
        entry = token_cache.load(key, len(records) * _PER_RECORD[scheme])
        if entry is not None:
            return entry
    entry = tokenize_all([(r.where, payload(r)) for r in records], tokenizer, max_length, workers, scheme=scheme)
    if key is not None:
        token_cache.store(key, entry)
    return entry


def tokenize_all(items: Sequence[tuple[str, Any]], tokenizer, max_length: int, workers: int | None = None, *,
                 scheme: str = SCHEME) -> token_cache.Entry:
    """The sequences of each ``(where, payload)``: ``Tokenized``, or ``TooLong`` above ``max_length``.

    A payload is a record's messages (``scheme`` chat-v1: one sequence) or its ``(prompt, chosen,
    rejected)`` (pair-v1: two). In ``workers`` processes (default: the CPUs this process may use, at
    most ``MAX_WORKERS``) when there are ``PARALLEL_MIN_RECORDS`` or more, else here.
    """
    workers = workers if workers is not None else min(MAX_WORKERS, len(os.sched_getaffinity(0)))
    if workers <= 1 or len(items) < PARALLEL_MIN_RECORDS:
        return _tokenize_items(tokenizer, items, max_length, scheme)
    chunks = [items[i : i + CHUNK_RECORDS] for i in range(0, len(items), CHUNK_RECORDS)]
    # forkserver, not fork: the driver has Ray's and the tokenizer's threads, which a fork copies mid-lock.
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=_start_worker,
                             initargs=(tokenizer,)) as pool:
        out: token_cache.Entry = []
        n = len(chunks)
        for part in pool.map(_worker_chunk, chunks, [max_length] * n, [scheme] * n):
            if isinstance(part, _Failure):
                raise DataError(part.where, part.message)
            out += part
    return out


def _chat(tokenizer, where: str, messages: list[dict]) -> list[Tokenized]:
    return [tokenize_conversation(tokenizer, messages, None, where=where)]


def _pair(tokenizer, where: str, pair: tuple[list[dict], list[dict], list[dict]]) -> list[Tokenized]:
    prompt, chosen, rejected = pair
    return [tokenize_completion(tokenizer, prompt, chosen, None, where),
            tokenize_completion(tokenizer, prompt, rejected, None, where)]


_SEQUENCES: dict[str, Callable[[Any, str, Any], list[Tokenized]]] = {SCHEME: _chat, PAIR_SCHEME: _pair}
_PER_RECORD = {SCHEME: 1, PAIR_SCHEME: 2}

_worker_tokenizer: Any = None


def _start_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


class _Failure:
    """A ``DataError`` from a worker (its two-argument constructor does not survive pickling)."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message


def _tokenize_items(tokenizer, items: Sequence[tuple[str, Any]], max_length: int, scheme: str) -> token_cache.Entry:
    sequences = _SEQUENCES[scheme]
    return [t if len(t) <= max_length else TooLong(len(t))
            for where, payload in items for t in sequences(tokenizer, where, payload)]


def _worker_chunk(items: Sequence[tuple[str, Any]], max_length: int, scheme: str) -> token_cache.Entry | _Failure:
    try:
        return _tokenize_items(_worker_tokenizer, items, max_length, scheme)
    except DataError as exc:
        return _Failure(exc.where, str(exc).removeprefix(f"data error: {exc.where}: "))

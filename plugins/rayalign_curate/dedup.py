"""Exact and near-duplicate removal: normalised-text hashes, then MinHash signatures with LSH.

Near duplicates are pairs whose character-shingle sets have Jaccard similarity >= ``threshold``.
MinHash (Broder 1997) estimates that similarity from ``num_perm`` hash minima; locality-sensitive
hashing splits the signature into ``bands`` of ``rows`` so that pairs above the threshold share at
least one band bucket with high probability. Candidates from shared buckets are then checked
against the exact Jaccard of their shingle sets, so the threshold is exact and LSH only decides
which pairs are worth checking.

Items are offered in priority order (test, then validation, then train) and an item is dropped
when it duplicates one already kept: a training example that repeats a test question is removed
from training, never the other way round.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_PRIME = 4294967291  # largest prime below 2**32: a*x + b of 32-bit values stays below 2**64
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Case, accents' composition, punctuation and spacing do not make two texts different."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def shingles(text: str, k: int) -> set[str]:
    """Character k-grams of the normalised text (the text itself when shorter)."""
    text = normalize(text)
    if len(text) <= k:
        return {text}
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _hash32(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising false positives + false negatives.

    A pair of similarity t shares a bucket with probability 1 - (1 - t**rows)**bands; we integrate
    that curve's error below and above the threshold and pick the best split.
    """
    grid = np.linspace(0, 1, 201)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        hit = 1 - (1 - grid**rows) ** bands
        error = np.trapezoid(np.where(grid < threshold, hit, 1 - hit), grid)
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


class MinHasher:
    def __init__(self, num_perm: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)

    def signature(self, grams: set[str]) -> np.ndarray:
        x = np.fromiter((_hash32(g) for g in grams), dtype=np.uint64, count=len(grams))
        return ((x[:, None] * self.a + self.b) % np.uint64(_PRIME)).min(axis=0)


@dataclass(frozen=True)
class Duplicate:
    of: int  # index of the kept item it duplicates
    kind: str  # "exact" or "near"
    similarity: float


class Deduplicator:
    """Offer items one at a time; ``add`` returns the Duplicate that drops it, or None when kept."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, near: bool = True,
                 seed: int = 0):
        self.threshold, self.shingle, self.near = threshold, shingle, near
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.hasher = MinHasher(self.bands * self.rows, seed)
        self.exact: dict[str, int] = {}
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.grams: dict[int, set[str]] = {}

    def add(self, index: int, text: str) -> Duplicate | None:
        key = hashlib.sha1(normalize(text).encode()).hexdigest()
        if key in self.exact:
            return Duplicate(self.exact[key], "exact", 1.0)
        grams = shingles(text, self.shingle) if self.near else set()
        if self.near:
            sig = self.hasher.signature(grams)
            keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
            candidates = {j for band, k in zip(self.buckets, keys) for j in band.get(k, ())}
            best = max(((jaccard(grams, self.grams[j]), j) for j in candidates), default=(0.0, -1))
            if best[0] >= self.threshold:
                return Duplicate(best[1], "near", best[0])
            for band, k in zip(self.buckets, keys):
                band.setdefault(k, []).append(index)
            self.grams[index] = grams
        self.exact[key] = index
        return None

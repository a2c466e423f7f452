"""Text measures shared by detectors, negative builders and evaluation: words, n-grams, loops, values.

Everything works on lower-cased words (``\\w+``), so it means the same for every tokenizer:

- ``rep_n(words, n)``: share of a text's word n-grams that repeat an earlier one,
  ``1 - unique / total`` (Welleck et al. 2019). 0 for a text with no repetition.
- ``distinct_n(texts, n)``: unique / total word n-grams pooled over texts (Li et al. 2016).
- ``find_loop(words)``: the longest block of words repeated back to back ("A B A B A B").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Sequence[str], n: int) -> float:
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: Iterable[str], n: int) -> float:
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class Loop:
    start: int  # index of the first word of the looped region
    period: int  # words in the repeated block
    repeats: int  # back-to-back copies of the block (the last one may be cut short: not counted)

    @property
    def words(self) -> int:
        return self.period * self.repeats


def find_loop(tokens: Sequence[str], max_period: int = 24) -> Loop | None:
    """The back-to-back repetition covering the most words, or None.

    For each period p, a run of positions with ``tokens[i] == tokens[i + p]`` of length L means
    the block starting the run occurs ``(L + p) // p`` times in a row.
    """
    best: Loop | None = None
    n = len(tokens)
    for p in range(1, min(max_period, n // 2) + 1):
        run = 0
        for i in range(n - p + 1):
            if i < n - p and tokens[i] == tokens[i + p]:
                run += 1
                continue
            if run >= p:  # at least two copies
                loop = Loop(start=i - run, period=p, repeats=(run + p) // p)
                if best is None or loop.words > best.words:
                    best = loop
            run = 0
    return best


def mentions(text: str, value: str) -> bool:
    """Whether ``value`` occurs in ``text`` as whole words, ignoring case."""
    value = value.strip()
    return bool(value) and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(text))


# Sentences that decline to answer. Matched case-insensitively anywhere in the answer.
DECLINE_PATTERNS = (
    r"\bI (?:do not|don't|dont) know\b",
    r"\bI(?: am|'m) not sure\b",
    r"\b(?:cannot|can't|can not) (?:answer|know|say|tell)\b",
    r"\bno (?:information|record|data) (?:about|on|of)\b",
)


def declines(text: str, patterns: Sequence[str] = DECLINE_PATTERNS) -> bool:
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def stutter(text: str, max_chunk: int = 8, min_repeats: int = 5) -> str | None:
    """A chunk of 1..max_chunk characters repeated ``min_repeats`` times in a row ("vovovovovo")."""
    m = re.search(rf"(\S{{1,{max_chunk}}}?)\1{{{min_repeats - 1},}}", text)
    return m.group(0) if m else None

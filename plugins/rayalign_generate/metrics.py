"""Built-in generation metrics."""

from __future__ import annotations

import re

from rayalign.evaluation.text import declines
from rayalign.metrics import Metric


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class ResponseWords(Metric):
    """Mean completion length in words."""

    name = "response_words"

    def compute(self, prompts, completions, references):
        return sum(len(_words(c)) for c in completions) / max(1, len(completions))


class Distinct2(Metric):
    """Distinct bigrams / all bigrams over all completions (Li et al. 2016); low means repetitive."""

    name = "distinct_2"

    def compute(self, prompts, completions, references):
        grams = [tuple(w[i : i + 2]) for w in map(_words, completions) for i in range(len(w) - 1)]
        return len(set(grams)) / len(grams) if grams else 0.0


class ExactMatch(Metric):
    """Share of completions equal to their reference (case and whitespace ignored)."""

    name = "exact_match"

    def compute(self, prompts, completions, references):
        pairs = [(c, r) for c, r in zip(completions, references) if r is not None]
        norm = lambda s: " ".join(_words(s))  # noqa: E731
        return sum(norm(c) == norm(r) for c, r in pairs) / len(pairs) if pairs else float("nan")


class DeclineRate(Metric):
    """Share of completions that decline to answer, over the prompts whose reference is a decline
    (questions the model cannot know the answer to); nan without such prompts."""

    name = "decline_rate"

    def compute(self, prompts, completions, references):
        asked = [c for c, r in zip(completions, references) if r is not None and declines(r)]
        return sum(map(declines, asked)) / len(asked) if asked else float("nan")


class AnsweredExactMatch(Metric):
    """``exact_match`` over the prompts whose reference answers (does not decline); nan without such prompts."""

    name = "answered_exact_match"

    def compute(self, prompts, completions, references):
        kept = [(c, r) for c, r in zip(completions, references) if r is not None and not declines(r)]
        return ExactMatch().compute([], [c for c, _ in kept], [r for _, r in kept]) if kept else float("nan")

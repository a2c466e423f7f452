"""A rule-based reward: does the answer contain the reference answer's key word?"""

from __future__ import annotations

import re


def mentions_reference(prompt: str, completion: str, reference: str | None = None) -> float:
    """1.0 when the completion contains the last word of the reference (case-insensitive)."""
    words = re.findall(r"\w+", reference or "")
    return float(bool(words) and words[-1].lower() in completion.lower())

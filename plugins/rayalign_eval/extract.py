"""Final answers out of free text: configurable regexes, then an optional fallback, then normalising.

A pattern's first group is the answer; the last match in the text wins, because models restate the
question's numbers before they conclude. Normalising makes "$1,000." equal "1000" and "3.0" equal
"3", so exact match means the same answer, not the same spelling.
"""

from __future__ import annotations

import re
from typing import Literal, Sequence

DEFAULT_PATTERNS = (
    r"answer is[:\s]*\**\s*\(?\$?([^\s()$*]+?)\)?[.,;!*]*(?:\s|$)",  # "The answer is 42." / "the final answer is: (B)"
    r"####\s*([^\n]+)",  # GSM8K's reference format
    r"\\boxed\{([^{}]+)\}",  # LaTeX answers
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Fallback = Literal["last_number", "whole", "none"]


def extract_answer(text: str, patterns: Sequence[str] = DEFAULT_PATTERNS, fallback: Fallback = "last_number"
                   ) -> tuple[str | None, str]:
    """(answer, how): how is the pattern that matched, the fallback's name, or "none"."""
    for pattern in patterns:
        matches = list(re.finditer(pattern, text, re.IGNORECASE))
        if matches:
            return matches[-1].group(1), pattern
    if fallback == "last_number":
        numbers = _NUMBER.findall(text)
        return (numbers[-1], "last_number") if numbers else (None, "none")
    if fallback == "whole" and text.strip():
        return text, "whole"
    return None, "none"


def normalize_answer(text: str | None) -> str:
    if text is None:
        return ""
    text = text.strip().strip(".,;:!?\"'`*()[]").strip().lower()
    text = text.replace("$", "").strip()
    if re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?", text):
        number = float(text.replace(",", ""))
        return str(int(number)) if number.is_integer() else repr(number)
    return " ".join(text.split())

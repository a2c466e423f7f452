"""Built-in quality filters: length bounds, refusals, and the character make-up of the text."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import Field

from rayalign.data.filters import Example, Filter, FilterConfig

# "I can't help with that" style answers: a model trained on many of them refuses too often.
REFUSAL_PATTERNS = (
    r"\bI(?: am|'m) (?:sorry|afraid),? (?:but )?I (?:can(?:no|')t|am unable|won't)\b",
    r"\bI (?:cannot|can't|can not|am unable to|won't) (?:help|assist|answer|provide|comply|do that)\b",
    r"\bas an AI(?: language model)?\b",
    r"\bI(?: am|'m) (?:not able|unable) to (?:help|assist|answer|provide)\b",
)


def is_refusal(text: str, patterns=REFUSAL_PATTERNS) -> bool:
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


class LengthConfig(FilterConfig):
    min_response_chars: int = Field(1, ge=0, description="drop answers shorter than this (characters)")
    max_response_chars: int | None = Field(None, ge=1, description="drop answers longer than this (null: no limit)")
    min_prompt_chars: int = Field(1, ge=0, description="drop prompts shorter than this")
    max_prompt_chars: int | None = Field(None, ge=1, description="drop prompts longer than this (null: no limit)")


class LengthFilter(Filter):
    """Drops records whose prompt or answer is shorter or longer than the bounds (characters)."""

    name = "length"
    Config = LengthConfig

    def reject(self, example: Example) -> str | None:
        c = self.config
        for part, text, low, high in (("response", example.response, c.min_response_chars, c.max_response_chars),
                                      ("prompt", example.prompt, c.min_prompt_chars, c.max_prompt_chars)):
            n = len(text.strip())
            if n < low:
                return f"{part} shorter than {low} chars"
            if high is not None and n > high:
                return f"{part} longer than {high} chars"
        return None


class RefusalConfig(FilterConfig):
    patterns: list[str] = Field(list(REFUSAL_PATTERNS), description="regexes (case-insensitive) of a refusal")


class RefusalFilter(Filter):
    """Drops records whose answer is a refusal ("I'm sorry, but I can't help with that")."""

    name = "refusal"
    Config = RefusalConfig

    def reject(self, example: Example) -> str | None:
        return "refusal" if is_refusal(example.response, self.config.patterns) else None


# Unicode script of a letter, by the first word of its character name (LATIN, CYRILLIC, CJK...).
SCRIPTS = {"latin": ("LATIN",), "cyrillic": ("CYRILLIC",), "greek": ("GREEK",), "arabic": ("ARABIC",),
           "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")}


def script_share(text: str, script: str) -> float:
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    prefixes = SCRIPTS[script]
    return sum(unicodedata.name(ch, "").startswith(prefixes) for ch in letters) / len(letters)


class CharRatioConfig(FilterConfig):
    min_alnum: float = Field(0.5, ge=0, le=1, description="least share of letters and digits among non-space "
                             "characters (drops symbol tables, markup and encoding debris)")
    script: Literal["any", "latin", "cyrillic", "greek", "arabic", "cjk"] = Field(
        "any", description="the language's script; letters of other scripts count against `min_script`")
    min_script: float = Field(0.8, ge=0, le=1, description="least share of letters in `script`")


class CharRatioFilter(Filter):
    """Drops text that is mostly symbols, or (with `script`) mostly in another writing system."""

    name = "char_ratio"
    Config = CharRatioConfig

    def reject(self, example: Example) -> str | None:
        text = example.prompt + "\n" + example.response
        chars = [ch for ch in text if not ch.isspace()]
        alnum = sum(ch.isalnum() for ch in chars) / max(1, len(chars))
        if alnum < self.config.min_alnum:  # a fixed reason, so the report counts drops by cause
            return f"letters and digits < {self.config.min_alnum:.0%}"
        if self.config.script != "any" and script_share(text, self.config.script) < self.config.min_script:
            return f"{self.config.script} letters < {self.config.min_script:.0%}"
        return None


FILTERS = [LengthFilter, RefusalFilter, CharRatioFilter]

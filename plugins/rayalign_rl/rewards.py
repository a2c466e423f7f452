"""Rule-based rewards: ``fn(prompt, completion, reference=..., **options) -> float``.

Registered by name (``register_rewards``) and combined with weights in an RL stage's ``rewards:``
list; ``options`` from the config arrive as keyword arguments, so one function serves many tasks
(e.g. ``pattern`` says where the final answer is). Each declares its options (``Config``), which
the stage checks before any work: a misspelt option is an error, not a silently ignored keyword.
"""

from __future__ import annotations

import re

from pydantic import Field

from rayalign.rewards import RewardConfig, reward_config

# The last number in the answer; tasks with a fixed final line pass their own `pattern`, e.g.
# "最终结果是\s*(-?\d+)" or "The answer is (.+)$".
LAST_NUMBER = r"(-?\d+(?:\.\d+)?)(?!.*\d)"


def _final(text: str, pattern: str) -> str | None:
    found = re.findall(pattern, text, flags=re.S)
    return found[-1].strip() if found else None


class PatternConfig(RewardConfig):
    pattern: str = Field(LAST_NUMBER, description="regex whose last match (its group) is the final answer; "
                         "default: the last number")


class LengthConfig(RewardConfig):
    max_chars: int = Field(512, ge=1, description="answers up to this many characters are not penalised")


@reward_config(PatternConfig)
def exact_match(prompt: str, completion: str, reference: str | None = None, pattern: str = LAST_NUMBER) -> float:
    """1.0 when the answer's final answer (``pattern``'s group) equals the reference's (or the
    whole stripped reference when the pattern finds nothing in it)."""
    if reference is None:
        return 0.0
    got = _final(completion, pattern)
    want = _final(reference, pattern) or reference.strip()
    return float(got is not None and got == want)


@reward_config(PatternConfig)
def format_check(prompt: str, completion: str, reference: str | None = None, pattern: str = LAST_NUMBER) -> float:
    """1.0 when the answer contains ``pattern`` at all (it states a final answer in the expected form)."""
    return float(re.search(pattern, completion, flags=re.S) is not None)


@reward_config(LengthConfig)
def length_penalty(prompt: str, completion: str, reference: str | None = None, max_chars: int = 512) -> float:
    """0 up to ``max_chars`` characters, then falling linearly to -1 at twice that length."""
    over = max(0, len(completion) - max_chars)
    return -min(1.0, over / max_chars)


RULE_REWARDS = {"exact_match": exact_match, "format_check": format_check, "length_penalty": length_penalty}
